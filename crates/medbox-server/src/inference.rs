//! `medbox.v1.Inference`: proto in, runtime types through the router, proto out.
//!
//! Generate and Chat share one path: both become a `ValidGenerateRequest`
//! and an engine stream; `collect` answers the unary forms and `forward`
//! the streamed ones. Chat adds a `ReasoningSplitter` for models that think.

use medbox_proto::v1 as pb;
use medbox_runtime::{
    ChatMessage, ChatRequest, Constraint, EmbedError, Engine, FinishReason, GenerateRequest,
    GenerationEvent, GenerationStream, ReasoningDelta, ReasoningSplitter, SamplingParams, Usage,
    ValidGenerateRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::{error::ApiError, request_log::RequestRecord, state::AppState};

/// Chunks buffered per stream between the engine's forwarder and the client.
const STREAM_BUFFER: usize = 32;

pub struct InferenceService {
    state: AppState,
}

/// A generation submitted to its engine, with what the answer needs.
struct Submitted {
    stream: GenerationStream,
    /// Present for chat with a thinking model.
    splitter: Option<ReasoningSplitter>,
}

/// One step of a generation as the client sees it.
#[derive(Default)]
struct Chunk {
    text: String,
    reasoning_text: String,
    token_ids: Vec<u32>,
    finish: Option<(FinishReason, Usage)>,
}

/// The whole of a unary answer.
struct Collected {
    text: String,
    reasoning_text: String,
    token_ids: Vec<u32>,
    reason: FinishReason,
    usage: Usage,
}

impl InferenceService {
    pub fn new(state: AppState) -> InferenceService {
        InferenceService { state }
    }

    /// Resolves the model for a text-generation method.
    fn engine(
        &self,
        model: &str,
        method: &'static str,
        record: &mut RequestRecord,
    ) -> Result<Engine, ApiError> {
        if model.is_empty() {
            return Err(ApiError::MissingField("model"));
        }
        let (model_name, engine) = self.state.router.causal_lm(model, method)?;
        record.model = Some(model_name);
        Ok(engine)
    }

    fn submit_generate(
        &self,
        request: pb::GenerateRequest,
        method: &'static str,
        record: &mut RequestRecord,
    ) -> Result<Submitted, ApiError> {
        let engine = self.engine(&request.model, method, record)?;
        record.prompt_text(|| request.prompt.clone());
        let valid = engine.validate(GenerateRequest {
            prompt: request.prompt,
            sampling: sampling_from_proto(request.sampling.unwrap_or_default()),
            constraint: request.constraint.map(generate_constraint),
        })?;
        submit(&engine, valid, None, record)
    }

    fn submit_chat(
        &self,
        request: pb::ChatRequest,
        method: &'static str,
        record: &mut RequestRecord,
    ) -> Result<Submitted, ApiError> {
        let engine = self.engine(&request.model, method, record)?;
        record.prompt_text(|| {
            let messages: Vec<_> = request
                .messages
                .iter()
                .map(
                    |message| serde_json::json!({"role": message.role, "content": message.content}),
                )
                .collect();
            serde_json::Value::Array(messages).to_string()
        });
        let valid = engine.validate_chat(ChatRequest {
            messages: request
                .messages
                .into_iter()
                .map(|message| ChatMessage {
                    role: message.role,
                    content: message.content,
                })
                .collect(),
            sampling: sampling_from_proto(request.sampling.unwrap_or_default()),
            constraint: request.constraint.map(chat_constraint),
        })?;
        let splitter = engine
            .thinks()
            .then(|| ReasoningSplitter::new(valid.starts_in_reasoning()));
        submit(&engine, valid, splitter, record)
    }
}

fn generate_constraint(constraint: pb::generate_request::Constraint) -> Constraint {
    use pb::generate_request::Constraint as Proto;
    match constraint {
        Proto::JsonSchema(schema) => Constraint::JsonSchema(schema),
        Proto::Regex(regex) => Constraint::Regex(regex),
        Proto::Grammar(grammar) => Constraint::Grammar(grammar),
    }
}

fn chat_constraint(constraint: pb::chat_request::Constraint) -> Constraint {
    use pb::chat_request::Constraint as Proto;
    match constraint {
        Proto::JsonSchema(schema) => Constraint::JsonSchema(schema),
        Proto::Regex(regex) => Constraint::Regex(regex),
        Proto::Grammar(grammar) => Constraint::Grammar(grammar),
    }
}

fn submit(
    engine: &Engine,
    valid: ValidGenerateRequest,
    splitter: Option<ReasoningSplitter>,
    record: &mut RequestRecord,
) -> Result<Submitted, ApiError> {
    record.prompt_tokens = u32::try_from(valid.prompt_tokens()).unwrap_or(u32::MAX);
    let model = record.model.clone().unwrap_or_default();
    let stream = engine
        .submit(valid)
        .map_err(|err| ApiError::from_engine(&model, err))?;
    record.submitted();
    Ok(Submitted { stream, splitter })
}

impl Submitted {
    /// The next chunk, or `None` when the engine closed the stream unfinished.
    async fn next_chunk(&mut self, model: &str) -> Option<Result<Chunk, ApiError>> {
        let event = self.stream.next().await?;
        Some(match event {
            GenerationEvent::Delta { text, token_ids } => {
                let (reasoning_text, text) = self.split(Some(&text));
                Ok(Chunk {
                    text,
                    reasoning_text,
                    token_ids,
                    finish: None,
                })
            }
            GenerationEvent::Finished { reason, usage } => {
                let (reasoning_text, text) = self.split(None);
                Ok(Chunk {
                    text,
                    reasoning_text,
                    token_ids: Vec::new(),
                    finish: Some((reason, usage)),
                })
            }
            GenerationEvent::Failed(err) => Err(ApiError::from_engine(model, err)),
        })
    }

    /// Splits new text into (reasoning, answer); `None` flushes at the end.
    fn split(&mut self, text: Option<&str>) -> (String, String) {
        match (&mut self.splitter, text) {
            (None, Some(text)) => (String::new(), text.to_owned()),
            (None, None) => (String::new(), String::new()),
            (Some(splitter), text) => {
                let ReasoningDelta { reasoning, answer } = match text {
                    Some(text) => splitter.push(text),
                    None => splitter.finish(),
                };
                (reasoning, answer)
            }
        }
    }

    /// Gathers the whole answer for a unary RPC.
    async fn collect(mut self, record: &mut RequestRecord) -> Result<Collected, ApiError> {
        let model = record.model.clone().unwrap_or_default();
        let mut collected = Collected {
            text: String::new(),
            reasoning_text: String::new(),
            token_ids: Vec::new(),
            reason: FinishReason::Cancelled,
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
            },
        };
        while let Some(chunk) = self.next_chunk(&model).await {
            let chunk = chunk?;
            if !chunk.token_ids.is_empty() {
                record.first_token();
            }
            record.answer_text(&chunk.reasoning_text);
            record.answer_text(&chunk.text);
            collected.text.push_str(&chunk.text);
            collected.reasoning_text.push_str(&chunk.reasoning_text);
            collected.token_ids.extend(chunk.token_ids);
            if let Some((reason, usage)) = chunk.finish {
                record.completion_tokens = usage.completion_tokens;
                collected.reason = reason;
                collected.usage = usage;
                return Ok(collected);
            }
        }
        Err(ApiError::Internal(
            "the engine closed a stream without finishing it".into(),
        ))
    }

    /// Streams the answer to the client from a task of its own; a client
    /// that goes away drops the engine stream, which cancels the sequence.
    fn forward<T: Send + 'static>(
        mut self,
        mut record: RequestRecord,
        to_proto: impl Fn(Chunk) -> T + Send + 'static,
    ) -> ReceiverStream<Result<T, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            let model = record.model.clone().unwrap_or_default();
            while let Some(chunk) = self.next_chunk(&model).await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(err) => {
                        record.finish(err.code(), Some(err.kind()));
                        let _client_may_be_gone = tx.send(Err(err.into())).await;
                        return;
                    }
                };
                if !chunk.token_ids.is_empty() {
                    record.first_token();
                }
                record.answer_text(&chunk.reasoning_text);
                record.answer_text(&chunk.text);
                let finished = chunk
                    .finish
                    .as_ref()
                    .map(|(_, usage)| usage.completion_tokens);
                if finished.is_none() {
                    record.completion_tokens += u32::try_from(chunk.token_ids.len()).unwrap_or(0);
                }
                let delivered = tx.send(Ok(to_proto(chunk))).await.is_ok();
                match (finished, delivered) {
                    (Some(completion_tokens), true) => {
                        record.completion_tokens = completion_tokens;
                        record.finish(Code::Ok, None);
                        return;
                    }
                    (_, false) => {
                        record.finish(Code::Cancelled, Some("client_cancelled"));
                        return;
                    }
                    (None, true) => {}
                }
            }
            let err = ApiError::Internal("the engine closed a stream without finishing it".into());
            record.finish(err.code(), Some(err.kind()));
            let _client_may_be_gone = tx.send(Err(err.into())).await;
        });
        ReceiverStream::new(rx)
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

fn usage_to_proto(usage: Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

fn finish_to_proto(finish: Option<(FinishReason, Usage)>) -> (String, Option<pb::Usage>) {
    match finish {
        Some((reason, usage)) => (reason.as_str().to_owned(), Some(usage_to_proto(usage))),
        None => (String::new(), None),
    }
}

/// Answers a unary generation: the whole text, or the error, recorded either way.
async fn answer_unary<T>(
    mut record: RequestRecord,
    submitted: Result<Submitted, ApiError>,
    build: impl FnOnce(Collected, String) -> T,
) -> Result<Response<T>, Status> {
    let submitted = match submitted {
        Ok(submitted) => submitted,
        Err(err) => return Err(record.fail(err)),
    };
    match submitted.collect(&mut record).await {
        Ok(answer) => {
            let model = record.model.clone().unwrap_or_default();
            record.finish(Code::Ok, None);
            Ok(Response::new(build(answer, model)))
        }
        Err(err) => Err(record.fail(err)),
    }
}

/// Answers a streamed generation; the record is written when the stream ends.
fn answer_stream<T: Send + 'static>(
    record: RequestRecord,
    submitted: Result<Submitted, ApiError>,
    to_proto: impl Fn(Chunk) -> T + Send + 'static,
) -> Result<Response<ReceiverStream<Result<T, Status>>>, Status> {
    match submitted {
        Ok(submitted) => Ok(Response::new(submitted.forward(record, to_proto))),
        Err(err) => Err(record.fail(err)),
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    #[tracing::instrument(skip_all)]
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Inference/Generate", &request);
        let request = request.into_inner();
        let request_id = record.adopt_client_request_id(&request.request_id);
        let submitted = self.submit_generate(request, "Generate", &mut record);
        answer_unary(record, submitted, |answer, model| pb::GenerateResponse {
            text: answer.text,
            token_ids: answer.token_ids,
            finish_reason: answer.reason.as_str().to_owned(),
            usage: Some(usage_to_proto(answer.usage)),
            request_id,
            model,
        })
        .await
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
            .begin_for("medbox.v1.Inference/GenerateStream", &request);
        let request = request.into_inner();
        let request_id = record.adopt_client_request_id(&request.request_id);
        let submitted = self.submit_generate(request, "GenerateStream", &mut record);
        answer_stream(record, submitted, move |chunk| {
            let (finish_reason, usage) = finish_to_proto(chunk.finish);
            pb::GenerateStreamResponse {
                text: chunk.text,
                token_ids: chunk.token_ids,
                finish_reason,
                usage,
                request_id: request_id.clone(),
            }
        })
    }

    #[tracing::instrument(skip_all)]
    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Inference/Chat", &request);
        let request = request.into_inner();
        let request_id = record.adopt_client_request_id(&request.request_id);
        let submitted = self.submit_chat(request, "Chat", &mut record);
        answer_unary(record, submitted, |answer, model| pb::ChatResponse {
            text: answer.text,
            reasoning_text: answer.reasoning_text,
            token_ids: answer.token_ids,
            finish_reason: answer.reason.as_str().to_owned(),
            usage: Some(usage_to_proto(answer.usage)),
            request_id,
            model,
        })
        .await
    }

    type ChatStreamStream = ReceiverStream<Result<pb::ChatStreamResponse, Status>>;

    #[tracing::instrument(skip_all)]
    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Inference/ChatStream", &request);
        let request = request.into_inner();
        let request_id = record.adopt_client_request_id(&request.request_id);
        let submitted = self.submit_chat(request, "ChatStream", &mut record);
        answer_stream(record, submitted, move |chunk| {
            let (finish_reason, usage) = finish_to_proto(chunk.finish);
            pb::ChatStreamResponse {
                text: chunk.text,
                reasoning_text: chunk.reasoning_text,
                token_ids: chunk.token_ids,
                finish_reason,
                usage,
                request_id: request_id.clone(),
            }
        })
    }

    #[tracing::instrument(skip_all)]
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Inference/Embed", &request);
        let request = request.into_inner();
        record.adopt_client_request_id(&request.request_id);
        if request.model.is_empty() {
            return Err(record.fail(ApiError::MissingField("model")));
        }
        let (model, embedder) = match self.state.router.embedding(&request.model, "Embed") {
            Ok(found) => found,
            Err(err) => return Err(record.fail(err)),
        };
        record.model = Some(model.clone());
        let dimensions = u32::try_from(embedder.info().dimensions).unwrap_or(u32::MAX);
        match embedder.embed(request.texts).await {
            Ok(vectors) => {
                record.finish(Code::Ok, None);
                Ok(Response::new(pb::EmbedResponse {
                    embeddings: vectors
                        .into_iter()
                        .map(|values| pb::Embedding { values })
                        .collect(),
                    model,
                    dimensions,
                    request_id: request.request_id,
                }))
            }
            Err(EmbedError::Invalid(err)) => Err(record.fail(ApiError::Invalid(err))),
            Err(EmbedError::Engine(err)) => Err(record.fail(ApiError::from_engine(&model, err))),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Inference/Tokenize", &request);
        let request = request.into_inner();
        let engine = match self.engine(&request.model, "Tokenize", &mut record) {
            Ok(engine) => engine,
            Err(err) => return Err(record.fail(err)),
        };
        match engine.tokenize(&request.text) {
            Ok(tokens) => {
                record.prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
                record.finish(Code::Ok, None);
                Ok(Response::new(pb::TokenizeResponse {
                    tokens: tokens
                        .into_iter()
                        .map(|token| pb::Token {
                            id: token.id,
                            text: token.text,
                        })
                        .collect(),
                }))
            }
            Err(err) => {
                let model = record.model.clone().unwrap_or_default();
                Err(record.fail(ApiError::Internal(format!("model `{model}`: {err}"))))
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Inference/ListModels", &request);
        let models = self.state.model_statuses();
        record.finish(Code::Ok, None);
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
