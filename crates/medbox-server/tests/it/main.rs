//! medboxd in-process: the real server on 127.0.0.1:0 with the tiny model,
//! reached through the generated Rust client.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use medbox_proto::v1::{self as pb, admin_client::AdminClient, inference_client::InferenceClient};
use medbox_server::{RunningServer, config::Config};
use tonic::{
    Code,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

mod agents;
mod authorization;
mod finetune_lora;
mod finetuning;
mod knowledge;
mod limits;
mod tls;

/// The tiny model folder, made once by the project's script (idempotent).
fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let cache = std::env::var_os("MEDBOX_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("medbox-test-cache"));
        let out = cache.join("models/tiny");
        let status = Command::new("python3")
            .arg(root.join("scripts/make-tiny-model"))
            .arg(&out)
            .status()
            .expect("python3 runs scripts/make-tiny-model (source scripts/env.sh)");
        assert!(status.success(), "scripts/make-tiny-model failed");
        out
    })
}

struct TestServer {
    server: RunningServer,
    channel: Channel,
    /// The admin key medboxd wrote at first start.
    admin_key: String,
    _data: tempfile::TempDir,
}

/// Sends `authorization: Bearer <key>` (or nothing) with every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    fn new(key: Option<&str>) -> Bearer {
        Bearer(key.map(|key| format!("Bearer {key}").parse().unwrap()))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

fn config_text(data_dir: &Path, extra_models: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nshutdown_grace_seconds = 20\n\
         [storage]\ndata_dir = \"{}\"\n\
         [[models]]\nname = \"tiny\"\npath = \"{}\"\naliases = [\"medical\"]\n{extra_models}",
        data_dir.display(),
        tiny_model().display()
    )
}

fn load_config(text: &str, dir: &Path) -> Config {
    let path = dir.join("medbox.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_with_env(Some(&path), Vec::new()).unwrap()
}

async fn start(extra_models: &str) -> TestServer {
    start_with(extra_models, "").await
}

/// Starts with extra `[[models]]` and extra configuration sections.
async fn start_with(extra_models: &str, extra_sections: &str) -> TestServer {
    let data = tempfile::tempdir().unwrap();
    let text = format!(
        "{}{extra_sections}",
        config_text(&data.path().join("data"), extra_models)
    );
    start_in(data, &text).await
}

/// Starts medboxd with the configuration `text`, written into `data` (whose
/// `data/` folder the configuration names; kept across restarts).
async fn start_in(data: tempfile::TempDir, text: &str) -> TestServer {
    let config = load_config(text, data.path());
    let server = medbox_server::start(config).await.expect("medboxd starts");
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    finish_start(server, channel, data).await
}

/// Waits for the models and reads the admin key of a started server.
async fn finish_start(
    server: RunningServer,
    channel: Channel,
    data: tempfile::TempDir,
) -> TestServer {
    let admin_key = std::fs::read_to_string(data.path().join("data/admin.key"))
        .expect("medboxd wrote the first admin key")
        .trim()
        .to_owned();
    let test = TestServer {
        server,
        channel,
        admin_key,
        _data: data,
    };
    test.wait_until_loaded().await;
    test
}

impl TestServer {
    fn inference(&self) -> InferenceClient<Authed> {
        InferenceClient::with_interceptor(self.channel.clone(), Bearer::new(Some(&self.admin_key)))
    }

    fn admin(&self) -> AdminClient<Authed> {
        AdminClient::with_interceptor(self.channel.clone(), Bearer::new(Some(&self.admin_key)))
    }

    async fn wait_until_loaded(&self) {
        let mut admin = self.admin();
        for _ in 0..600 {
            let models = admin
                .list_models(pb::ListModelsRequest {})
                .await
                .unwrap()
                .into_inner()
                .models;
            if models.iter().all(|model| model.state != "loading") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("models still loading after 60 s");
    }
}

fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: "tiny".into(),
        prompt: prompt.into(),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        request_id: String::new(),
        constraint: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_stream_and_unary_agree() {
    let test = start("").await;
    let mut client = test.inference();
    let request = greedy("Blood pressure 150/95 mmHg; advice:", 24);
    let unary = client.generate(request.clone()).await.unwrap().into_inner();
    assert_eq!(unary.token_ids.len(), 24);
    assert_eq!(unary.finish_reason, "length");
    assert_eq!(unary.usage.unwrap().completion_tokens, 24);

    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut last = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        text.push_str(&chunk.text);
        ids.extend(chunk.token_ids.iter().copied());
        last = Some(chunk);
    }
    assert_eq!(text, unary.text);
    assert_eq!(ids, unary.token_ids);
    assert_eq!(last.unwrap().finish_reason, "length");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_what_is_at_fault() {
    let test = start("").await;
    let mut client = test.inference();
    let check = |status: tonic::Status, code: Code, needle: &str| {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{status:?} should name {needle}"
        );
    };
    let mut unknown = greedy("hi", 4);
    unknown.model = "cardiology-70b".into();
    check(
        client.generate(unknown).await.unwrap_err(),
        Code::NotFound,
        "cardiology-70b",
    );
    check(
        client.generate(greedy("", 4)).await.unwrap_err(),
        Code::InvalidArgument,
        "prompt",
    );
    check(
        client.generate(greedy("hi", 10_000_000)).await.unwrap_err(),
        Code::InvalidArgument,
        "max_tokens",
    );
    let mut no_model = greedy("hi", 4);
    no_model.model.clear();
    check(
        client.generate(no_model).await.unwrap_err(),
        Code::InvalidArgument,
        "model",
    );
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_fails_alone() {
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("config.json"),
        r#"{"architectures": ["GPT9000ForCausalLM"], "model_type": "gpt9000"}"#,
    )
    .unwrap();
    let extra = format!(
        "[[models]]\nname = \"broken\"\npath = \"{}\"\n",
        broken.path().display()
    );
    let test = start(&extra).await;
    let models = test
        .inference()
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let states: Vec<_> = models
        .iter()
        .map(|m| (m.name.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(states, [("tiny", "ready"), ("broken", "failed")]);
    assert!(!models[1].error.is_empty());

    let mut request = greedy("hi", 4);
    request.model = "broken".into();
    let status = test.inference().generate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("broken"));
    // The healthy model keeps serving.
    test.inference().generate(greedy("hi", 4)).await.unwrap();
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_named() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = \"{}\"\n",
        dir.path().display()
    );
    let err = match medbox_server::start(load_config(&text, dir.path())).await {
        Ok(_) => panic!("start must fail on a port in use"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains("server.listen") && err.contains(&port.to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_inflight_stream_finish() {
    let test = start("").await;
    let mut stream = test
        .inference()
        .generate_stream(greedy("Follow-up plan:", 200))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let mut count = first.token_ids.len();
    let shutdown = tokio::spawn(test.server.shutdown());
    let mut finish = String::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        count += chunk.token_ids.len();
        finish = chunk.finish_reason;
    }
    assert_eq!((count, finish.as_str()), (200, "length"));
    shutdown.await.unwrap().unwrap();
}

/// A plain HTTP/1.0 GET, enough for a scrape.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped() {
    let test = start("").await;
    test.inference()
        .generate(greedy("Cough for two weeks", 8))
        .await
        .unwrap();
    let mut unknown = greedy("hi", 2);
    unknown.model = "nope".into();
    test.inference().generate(unknown).await.unwrap_err();
    // The engine updates its load gauges after the step that ended the
    // request, which may come just after the client has its answer.
    let mut body = String::new();
    for _ in 0..100 {
        body = http_get(test.server.metrics_addr().unwrap(), "/metrics").await;
        if body.contains("medbox_num_requests_running{model=\"tiny\"} 0") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    for needle in [
        "medbox_requests_total{code=\"OK\",method=\"medbox.v1.Inference/Generate\"} 1",
        "medbox_requests_total{code=\"NOT_FOUND\",method=\"medbox.v1.Inference/Generate\"} 1",
        "medbox_request_duration_seconds_bucket",
        "medbox_time_to_first_token_seconds_count{model=\"tiny\"} 1",
        "medbox_time_per_output_token_seconds_count{model=\"tiny\"} 1",
        "medbox_prompt_tokens_total{model=\"tiny\"}",
        "medbox_generation_tokens_total{model=\"tiny\"} 8",
        "medbox_requests_in_flight{model=\"tiny\"} 0",
        "medbox_models{state=\"ready\"} 1",
        "medbox_num_requests_waiting{model=\"tiny\"} 0",
        "medbox_num_requests_running{model=\"tiny\"} 0",
        "process_resident_memory_bytes",
    ] {
        assert!(body.contains(needle), "metrics lack `{needle}`:\n{body}");
    }
    // No prompt text ever reaches the metrics.
    assert!(!body.contains("Cough"));
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_load_switch_aliases_and_unload_live() {
    let test = start("").await;
    let mut admin = test.admin();
    // A second version of the model, loaded while `tiny` keeps serving;
    // `medical` moves to it once it is ready.
    let loaded = admin
        .load_model(pb::LoadModelRequest {
            name: "tiny-v2".into(),
            path: tiny_model().display().to_string(),
            aliases: vec!["medical".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(
        (loaded.state.as_str(), loaded.aliases.clone()),
        ("ready", vec!["medical".to_owned()])
    );
    let mut request = greedy("fever", 2);
    request.model = "medical".into();
    let answer = test
        .inference()
        .generate(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.model, "tiny-v2");
    // Roll back: the same name and folder again only moves the alias.
    admin
        .load_model(pb::LoadModelRequest {
            name: "tiny".into(),
            path: tiny_model().display().to_string(),
            aliases: vec!["medical".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let answer = test
        .inference()
        .generate(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.model, "tiny");
    // Unload: NOT_FOUND from then on; the registered folder reloads by name.
    admin
        .unload_model(pb::UnloadModelRequest {
            name: "tiny-v2".into(),
        })
        .await
        .unwrap();
    let mut gone = greedy("fever", 2);
    gone.model = "tiny-v2".into();
    assert_eq!(
        test.inference()
            .generate(gone.clone())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    admin
        .load_model(pb::LoadModelRequest {
            name: "tiny-v2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    test.inference().generate(gone).await.unwrap();
    // Faults name the field.
    let status = admin
        .load_model(pb::LoadModelRequest {
            name: "x".into(),
            path: "/no/such/folder".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("path"), "{status:?}");
    test.server.shutdown().await.unwrap();
}
