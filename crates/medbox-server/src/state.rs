//! What every service shares.

use std::{sync::Arc, time::Instant};

use medbox_proto::v1 as pb;
use medbox_store::Store;

use crate::{request_log::RequestLogger, router::ModelRouter};

#[derive(Clone)]
pub struct AppState {
    pub router: Arc<ModelRouter>,
    pub log: RequestLogger,
    pub store: Store,
    pub started: Instant,
}

impl AppState {
    /// Every configured model with its state, as `ListModels` and `Status` show it.
    pub fn model_statuses(&self) -> Vec<pb::ModelStatus> {
        self.router
            .views()
            .into_iter()
            .map(|view| {
                let info = view.info;
                pb::ModelStatus {
                    name: view.name,
                    aliases: view.aliases,
                    kind: view.kind.as_str().to_owned(),
                    state: view.state.to_owned(),
                    error: view.error.unwrap_or_default(),
                    architecture: info
                        .as_ref()
                        .map(|info| info.architecture.clone())
                        .unwrap_or_default(),
                    dtype: info
                        .as_ref()
                        .map(|info| info.dtype.to_string())
                        .unwrap_or_default(),
                    device: info
                        .as_ref()
                        .map(|info| info.device.to_string())
                        .unwrap_or_default(),
                    max_context: info
                        .as_ref()
                        .map(|info| u32::try_from(info.max_context).unwrap_or(u32::MAX))
                        .unwrap_or_default(),
                }
            })
            .collect()
    }
}
