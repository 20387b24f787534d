//! `medbox.v1.Inference`: proto in, runtime types through the router, proto out.

use medbox_proto::v1 as pb;
use medbox_runtime::{GenerateRequest, GenerationEvent, SamplingParams};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::{error::ApiError, request_log::RequestRecord, state::AppState};

/// Chunks buffered per stream between the engine's forwarder and the client.
const STREAM_BUFFER: usize = 32;

pub struct InferenceService {
    state: AppState,
}

impl InferenceService {
    pub fn new(state: AppState) -> InferenceService {
        InferenceService { state }
    }

    /// Resolves the model, validates the request against it and submits it.
    fn start_generation(
        &self,
        request: pb::GenerateRequest,
        method: &'static str,
        record: &mut RequestRecord,
    ) -> Result<medbox_runtime::GenerationStream, ApiError> {
        if request.model.is_empty() {
            return Err(ApiError::MissingField("model"));
        }
        let (model_name, engine) = self.state.router.causal_lm(&request.model, method)?;
        record.model = Some(model_name.clone());
        let valid = engine.validate(GenerateRequest {
            prompt: request.prompt,
            sampling: sampling_from_proto(request.sampling.unwrap_or_default()),
        })?;
        record.prompt_tokens = u32::try_from(valid.prompt_tokens()).unwrap_or(u32::MAX);
        engine
            .submit(valid)
            .map_err(|err| ApiError::from_engine(&model_name, err))
    }
}

fn sampling_from_proto(sampling: pb::SamplingParams) -> SamplingParams {
    SamplingParams {
        max_tokens: sampling.max_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        repetition_penalty: sampling.repetition_penalty,
        seed: sampling.seed,
        stop: sampling.stop,
        ignore_eos: sampling.ignore_eos,
    }
}

fn usage_to_proto(usage: medbox_runtime::Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    #[tracing::instrument(skip_all)]
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut record = self.state.log.begin("Generate", request.remote_addr());
        let request = request.into_inner();
        let request_id = request.request_id.clone();
        record.request_id = non_empty(request.request_id.clone());
        let mut stream = match self.start_generation(request, "Generate", &mut record) {
            Ok(stream) => stream,
            Err(err) => {
                record.finish(err.code(), Some(err.kind()));
                return Err(err.into());
            }
        };
        let mut text = String::new();
        let mut token_ids = Vec::new();
        while let Some(event) = stream.next().await {
            match event {
                GenerationEvent::Delta {
                    text: delta,
                    token_ids: ids,
                } => {
                    text.push_str(&delta);
                    token_ids.extend(ids);
                }
                GenerationEvent::Finished { reason, usage } => {
                    record.completion_tokens = usage.completion_tokens;
                    let model = record.model.clone().unwrap_or_default();
                    record.finish(Code::Ok, None);
                    return Ok(Response::new(pb::GenerateResponse {
                        text,
                        token_ids,
                        finish_reason: reason.as_str().to_owned(),
                        usage: Some(usage_to_proto(usage)),
                        request_id,
                        model,
                    }));
                }
                GenerationEvent::Failed(err) => {
                    let err = ApiError::from_engine(record.model.as_deref().unwrap_or(""), err);
                    record.finish(err.code(), Some(err.kind()));
                    return Err(err.into());
                }
            }
        }
        let err = ApiError::Internal("the engine closed a stream without finishing it".into());
        record.finish(err.code(), Some(err.kind()));
        Err(err.into())
    }

    type GenerateStreamStream = ReceiverStream<Result<pb::GenerateStreamResponse, Status>>;

    #[tracing::instrument(skip_all)]
    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let mut record = self
            .state
            .log
            .begin("GenerateStream", request.remote_addr());
        let request = request.into_inner();
        let request_id = request.request_id.clone();
        record.request_id = non_empty(request.request_id.clone());
        let mut stream = match self.start_generation(request, "GenerateStream", &mut record) {
            Ok(stream) => stream,
            Err(err) => {
                record.finish(err.code(), Some(err.kind()));
                return Err(err.into());
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let chunk = match event {
                    GenerationEvent::Delta { text, token_ids } => {
                        record.completion_tokens += u32::try_from(token_ids.len()).unwrap_or(0);
                        Ok(pb::GenerateStreamResponse {
                            text,
                            token_ids,
                            finish_reason: String::new(),
                            usage: None,
                            request_id: request_id.clone(),
                        })
                    }
                    GenerationEvent::Finished { reason, usage } => {
                        record.completion_tokens = usage.completion_tokens;
                        let last = pb::GenerateStreamResponse {
                            text: String::new(),
                            token_ids: Vec::new(),
                            finish_reason: reason.as_str().to_owned(),
                            usage: Some(usage_to_proto(usage)),
                            request_id: request_id.clone(),
                        };
                        let delivered = tx.send(Ok(last)).await.is_ok();
                        let code = if delivered { Code::Ok } else { Code::Cancelled };
                        record.finish(code, None);
                        return;
                    }
                    GenerationEvent::Failed(err) => {
                        let err = ApiError::from_engine(record.model.as_deref().unwrap_or(""), err);
                        record.finish(err.code(), Some(err.kind()));
                        let _client_may_be_gone = tx.send(Err(err.into())).await;
                        return;
                    }
                };
                if tx.send(chunk).await.is_err() {
                    // The client went away: dropping `stream` cancels the
                    // sequence at the engine's next step.
                    record.finish(Code::Cancelled, Some("client_cancelled"));
                    return;
                }
            }
            let err = ApiError::Internal("the engine closed a stream without finishing it".into());
            record.finish(err.code(), Some(err.kind()));
            let _client_may_be_gone = tx.send(Err(err.into())).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all)]
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let mut record = self.state.log.begin("Tokenize", request.remote_addr());
        let request = request.into_inner();
        let result = (|| {
            if request.model.is_empty() {
                return Err(ApiError::MissingField("model"));
            }
            let (model_name, engine) = self.state.router.causal_lm(&request.model, "Tokenize")?;
            record.model = Some(model_name.clone());
            let tokens = engine
                .tokenize(&request.text)
                .map_err(|err| ApiError::Internal(format!("model `{model_name}`: {err}")))?;
            record.prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
            Ok(pb::TokenizeResponse {
                tokens: tokens
                    .into_iter()
                    .map(|token| pb::Token {
                        id: token.id,
                        text: token.text,
                    })
                    .collect(),
            })
        })();
        match result {
            Ok(response) => {
                record.finish(Code::Ok, None);
                Ok(Response::new(response))
            }
            Err(err) => {
                record.finish(err.code(), Some(err.kind()));
                Err(err.into())
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let record = self.state.log.begin("ListModels", request.remote_addr());
        let models = self.state.model_statuses();
        record.finish(Code::Ok, None);
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
