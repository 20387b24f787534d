//! TLS and mutual TLS with certificates made in the test.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::{config_text, finish_start, load_config};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    /// A client certificate from a CA the server does not trust.
    stranger: (String, String),
}

fn issue(issuer: &CertifiedIssuer<'_, KeyPair>, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(
        names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn certificate_authority() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn pki() -> Pki {
    let ca = certificate_authority();
    let other_ca = certificate_authority();
    Pki {
        ca_pem: ca.pem(),
        server: issue(&ca, &["localhost", "127.0.0.1"]),
        client: issue(&ca, &["ward-5-tablet"]),
        stranger: issue(&other_ca, &["intruder"]),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn start_tls(pki: &Pki, mutual: bool) -> (crate::TestServer, std::net::SocketAddr) {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let mut tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        write(dir, "server.crt", &pki.server.0),
        write(dir, "server.key", &pki.server.1)
    );
    if mutual {
        tls.push_str(&format!(
            "client_ca = \"{}\"\n",
            write(dir, "ca.crt", &pki.ca_pem)
        ));
    }
    let text = format!("{}{tls}", config_text(&dir.join("data"), ""));
    let server = medbox_server::start(load_config(&text, dir))
        .await
        .expect("medboxd starts with TLS");
    let addr = server.local_addr();
    let channel = connect(addr, &pki.ca_pem, mutual.then_some(&pki.client))
        .await
        .unwrap();
    (finish_start(server, channel, data).await, addr)
}

async fn connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn list_models(channel: Channel, key: &str) -> Result<usize, tonic::Status> {
    let mut client = medbox_proto::v1::inference_client::InferenceClient::with_interceptor(
        channel,
        crate::Bearer::new(Some(key)),
    );
    Ok(client
        .list_models(medbox_proto::v1::ListModelsRequest {})
        .await?
        .into_inner()
        .models
        .len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_and_plaintext_is_refused() {
    let pki = pki();
    let (test, addr) = start_tls(&pki, false).await;
    assert_eq!(
        list_models(test.channel.clone(), &test.admin_key)
            .await
            .unwrap(),
        1
    );
    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => list_models(channel, &test.admin_key).await.is_err(),
    };
    assert!(refused, "a plaintext client was served by a TLS listener");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let pki = pki();
    let (test, addr) = start_tls(&pki, true).await;
    assert_eq!(
        list_models(test.channel.clone(), &test.admin_key)
            .await
            .unwrap(),
        1
    );
    for (what, identity) in [
        ("no client certificate", None),
        ("an untrusted client certificate", Some(&pki.stranger)),
    ] {
        let served = match connect(addr, &pki.ca_pem, identity).await {
            Err(_) => false,
            Ok(channel) => list_models(channel, &test.admin_key).await.is_ok(),
        };
        assert!(!served, "a client with {what} was served under mutual TLS");
    }
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_file_is_named() {
    let data = tempfile::tempdir().unwrap();
    let text = format!(
        "{}[tls]\ncert = \"/no/such/server.crt\"\nkey = \"/no/such/server.key\"\n",
        config_text(&data.path().join("data"), "")
    );
    let err = match medbox_server::start(load_config(&text, data.path())).await {
        Ok(_) => panic!("start must fail without the certificate"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains("tls.cert") && err.contains("/no/such/server.crt"),
        "{err}"
    );
}
