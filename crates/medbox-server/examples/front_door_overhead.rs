//! What the front door (auth, audit, limits, metrics) adds to a request:
//! the same Tokenize call against two in-process medboxd, one with auth on
//! and one with auth off, interleaved in one run.
//!
//!     cargo run --release -p medbox-server --example front_door_overhead -- MODEL_DIR [CALLS]

use std::time::{Duration, Instant};

use medbox_proto::v1::{self as pb, inference_client::InferenceClient};
use medbox_server::config::Config;
use tonic::transport::Channel;

async fn start(
    model: &str,
    auth: bool,
    dir: &std::path::Path,
) -> (medbox_server::RunningServer, Channel, Option<String>) {
    let data = dir.join(if auth { "on" } else { "off" });
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[auth]\nenabled = {auth}\n\
         [limits]\nrequests_per_second = 1000000\nburst = 1000000\n\
         [storage]\ndata_dir = \"{}\"\n[[models]]\nname = \"m\"\npath = \"{model}\"\n",
        data.display()
    );
    let path = dir.join(format!("{auth}.toml"));
    std::fs::write(&path, text).expect("config written");
    let config = Config::load_with_env(Some(&path), Vec::new()).expect("config");
    let server = medbox_server::start(config).await.expect("medboxd starts");
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))
        .expect("address")
        .connect()
        .await
        .expect("connects");
    let key = auth.then(|| {
        std::fs::read_to_string(data.join("admin.key"))
            .expect("admin key")
            .trim()
            .to_owned()
    });
    (server, channel, key)
}

async fn one_call(channel: &Channel, key: Option<&str>) -> Duration {
    let mut client = InferenceClient::new(channel.clone());
    let mut request = tonic::Request::new(pb::TokenizeRequest {
        model: "m".into(),
        text: "Blood pressure 150/95 mmHg".into(),
    });
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ascii"),
        );
    }
    let started = Instant::now();
    client.tokenize(request).await.expect("tokenize");
    started.elapsed()
}

fn median_us(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .expect("usage: front_door_overhead MODEL_DIR [CALLS]");
    let calls: usize = args
        .next()
        .map_or(2000, |text| text.parse().expect("CALLS is a number"));
    let dir = tempfile::tempdir().expect("temp dir");
    let (on, on_channel, key) = start(&model, true, dir.path()).await;
    let (off, off_channel, _) = start(&model, false, dir.path()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..200 {
        one_call(&on_channel, key.as_deref()).await;
        one_call(&off_channel, None).await;
    }
    let (mut with_auth, mut without) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for _ in 0..calls {
        with_auth.push(one_call(&on_channel, key.as_deref()).await);
        without.push(one_call(&off_channel, None).await);
    }
    let (on_us, off_us) = (median_us(&mut with_auth), median_us(&mut without));
    println!("Tokenize, {calls} calls each, interleaved, median latency:");
    println!("  full front door (auth + scopes + limits + audit): {on_us:8.1} µs");
    println!("  auth off (limits + audit still on):               {off_us:8.1} µs");
    println!(
        "  added by authentication: {:.1} µs per request ({:.2}x)",
        on_us - off_us,
        on_us / off_us
    );
    on.shutdown().await.expect("stops");
    off.shutdown().await.expect("stops");
}
