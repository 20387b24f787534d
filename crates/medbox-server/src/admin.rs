//! `medbox.v1.Admin`: what IT staff look at on a running box.

use medbox_proto::v1 as pb;
use tonic::{Code, Request, Response, Status};

use crate::state::AppState;

pub struct AdminService {
    state: AppState,
}

impl AdminService {
    pub fn new(state: AppState) -> AdminService {
        AdminService { state }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let record = self
            .state
            .log
            .begin("Admin.ListModels", request.remote_addr());
        let models = self.state.model_statuses();
        record.finish(Code::Ok, None);
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    #[tracing::instrument(skip_all)]
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let record = self.state.log.begin("Admin.Status", request.remote_addr());
        let response = pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.state.started.elapsed().as_secs(),
            storage: self.state.store.backend().as_str().to_owned(),
            models: self.state.model_statuses(),
        };
        record.finish(Code::Ok, None);
        Ok(Response::new(response))
    }
}
