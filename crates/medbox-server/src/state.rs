//! What every service shares.

use std::{sync::Arc, time::Instant};

use medbox_proto::v1 as pb;
use medbox_store::Store;

use crate::{
    request_log::RequestLogger,
    router::{ModelRouter, ModelView},
};

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
            .map(|view| self.model_status(view))
            .collect()
    }

    /// One model's state as `ListModels` shows it.
    pub fn model_status(&self, view: ModelView) -> pb::ModelStatus {
        let details = view.details;
        pb::ModelStatus {
            name: view.name,
            aliases: view.aliases,
            kind: view.kind.as_str().to_owned(),
            state: view.state.to_owned(),
            error: view.error.unwrap_or_default(),
            architecture: details
                .as_ref()
                .map(|details| details.architecture.clone())
                .unwrap_or_default(),
            dtype: details
                .as_ref()
                .map(|details| details.dtype.to_string())
                .unwrap_or_default(),
            device: details
                .as_ref()
                .map(|details| details.device.to_string())
                .unwrap_or_default(),
            max_context: details
                .as_ref()
                .map(|details| u32::try_from(details.max_context).unwrap_or(u32::MAX))
                .unwrap_or_default(),
            base_model: view.base_model.unwrap_or_default(),
        }
    }
}
