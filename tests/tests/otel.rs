//! OpenTelemetry end to end: the three real services export over OTLP/gRPC
//! to a receiver built in this test while a full flow runs, the release
//! started by the real `twokey` CLI. One release is one trace from the CLI
//! through broker and vault to audit with the right parent links; the audit
//! event carries that trace; metrics arrive; and neither what was exported
//! nor any service log holds the seed, the PIN or the code.

use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    metrics::v1::{ResourceMetrics, metric::Data},
    trace::v1::{ResourceSpans, span::SpanKind},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use twokey_e2e::{SECRET, System, bin_dir};
use twokey_testkit::local::ACCOUNT;

/// The trace the test starts, as a caller of the CLI would (`TRACEPARENT`).
const TRACE_ID: &str = "5c1e2b7a9d3f4e6081a2b3c4d5e6f708";
const ROOT_SPAN: &str = "a1b2c3d4e5f60718";
/// How long anything may take to arrive.
const DEADLINE: Duration = Duration::from_secs(20);

/// What the receiver got, and a counter bumped on every export.
#[derive(Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<ResourceSpans>>>,
    metrics: Arc<Mutex<Vec<ResourceMetrics>>>,
    exports: watch::Sender<u64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.spans
            .lock()
            .unwrap()
            .extend(request.into_inner().resource_spans);
        self.exports.send_modify(|n| *n += 1);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics
            .lock()
            .unwrap()
            .extend(request.into_inner().resource_metrics);
        self.exports.send_modify(|n| *n += 1);
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Receiver {
    /// Waits (on exports, at most [`DEADLINE`]) until `done` holds for
    /// what was received.
    async fn wait_for<T>(&self, what: &str, mut done: impl FnMut(&Self) -> Option<T>) -> T {
        let mut rx = self.exports.subscribe();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            rx.borrow_and_update();
            if let Some(t) = done(self) {
                return t;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!("{what} did not arrive within {DEADLINE:?}");
            }
        }
    }
}

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn service_of(resource: &Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .as_ref()
        .map(|r| attrs(&r.attributes))
        .and_then(|a| a.get("service.name").cloned())
        .unwrap_or_default()
}

fn spans(r: &Receiver) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in r.spans.lock().unwrap().iter() {
        let service = service_of(&rs.resource);
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(Span {
                    service: service.clone(),
                    name: s.name.clone(),
                    kind: s.kind,
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent: hex::encode(&s.parent_span_id),
                    attributes: attrs(&s.attributes),
                });
            }
        }
    }
    out
}

/// Every string the receiver got: resource, scope, span and event names and
/// attributes, metric names, descriptions and data point attributes.
fn received_strings(r: &Receiver) -> Vec<String> {
    let mut out = Vec::new();
    let push_attrs = |out: &mut Vec<String>, kvs: &[KeyValue]| {
        for (k, v) in attrs(kvs) {
            out.push(k);
            out.push(v);
        }
    };
    for rs in r.spans.lock().unwrap().iter() {
        if let Some(res) = &rs.resource {
            push_attrs(&mut out, &res.attributes);
        }
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(s.name.clone());
                push_attrs(&mut out, &s.attributes);
                for e in &s.events {
                    out.push(e.name.clone());
                    push_attrs(&mut out, &e.attributes);
                }
                for l in &s.links {
                    push_attrs(&mut out, &l.attributes);
                }
                if let Some(st) = &s.status {
                    out.push(st.message.clone());
                }
            }
        }
    }
    for rm in r.metrics.lock().unwrap().iter() {
        if let Some(res) = &rm.resource {
            push_attrs(&mut out, &res.attributes);
        }
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                out.push(m.name.clone());
                out.push(m.description.clone());
                let point_attrs: Vec<&[KeyValue]> = match &m.data {
                    Some(Data::Sum(s)) => s.data_points.iter().map(|p| &p.attributes[..]).collect(),
                    Some(Data::Gauge(g)) => {
                        g.data_points.iter().map(|p| &p.attributes[..]).collect()
                    }
                    Some(Data::Histogram(h)) => {
                        h.data_points.iter().map(|p| &p.attributes[..]).collect()
                    }
                    _ => Vec::new(),
                };
                for a in point_attrs {
                    push_attrs(&mut out, a);
                }
            }
        }
    }
    out
}

/// The sum of counter `name` exported by `service` (latest export).
fn counter(r: &Receiver, service: &str, name: &str) -> Option<i64> {
    let mut latest = None;
    for rm in r.metrics.lock().unwrap().iter() {
        if service_of(&rm.resource) != service {
            continue;
        }
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            if let (true, Some(Data::Sum(s))) = (m.name == name, &m.data) {
                let total = s
                    .data_points
                    .iter()
                    .map(|p| match p.value {
                        Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => i,
                        Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d)) => d as i64,
                        None => 0,
                    })
                    .sum();
                latest = Some(total);
            }
        }
    }
    latest
}

/// The count of histogram `name` exported by `service` (latest export).
fn histogram_count(r: &Receiver, service: &str, name: &str) -> Option<u64> {
    let mut latest = None;
    for rm in r.metrics.lock().unwrap().iter() {
        if service_of(&rm.resource) != service {
            continue;
        }
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            if let (true, Some(Data::Histogram(h))) = (m.name == name, &m.data) {
                latest = Some(h.data_points.iter().map(|p| p.count).sum());
            }
        }
    }
    latest
}

/// The value of gauge `name` exported by `service` (latest export).
fn gauge(r: &Receiver, service: &str, name: &str) -> Option<f64> {
    let mut latest = None;
    for rm in r.metrics.lock().unwrap().iter() {
        if service_of(&rm.resource) != service {
            continue;
        }
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            if let (true, Some(Data::Gauge(g))) = (m.name == name, &m.data) {
                latest = g.data_points.first().and_then(|p| match p.value {
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i),
                    ) => Some(i as f64),
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(
                            d,
                        ),
                    ) => Some(d),
                    None => None,
                });
            }
        }
    }
    latest
}

/// Whether `needle` (all digits) stands alone in `hay`: a run of digits
/// equal to it, not part of a longer number.
fn has_number(hay: &str, needle: &str) -> bool {
    hay.split(|c: char| !c.is_ascii_digit())
        .any(|run| run == needle)
}

/// Panics if `hay` (from `what`) holds the seed, the PIN or a code.
fn assert_no_secret(what: &str, hay: &str, pin: &str, codes: &[String]) {
    assert!(!hay.contains(SECRET), "{what} contains the seed");
    assert!(!has_number(hay, pin), "{what} contains the PIN {pin}");
    for code in codes {
        assert!(!has_number(hay, code), "{what} contains the code {code}");
    }
}

/// The TOTP codes around now (SHA1, 6 digits, 30 s), any of which the
/// release may have produced.
fn codes_around_now() -> Vec<String> {
    let seed = data_encoding::BASE32_NOPAD
        .decode(SECRET.as_bytes())
        .unwrap();
    let totp = totp_rs::Builder::new()
        .with_secret(seed)
        .build_noncompliant();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (now / 30 - 4..=now / 30 + 4)
        .map(|step| totp.generate(step * 30).to_string())
        .collect()
}

async fn start_receiver() -> (Receiver, String, tokio::sync::oneshot::Sender<()>) {
    let (exports, _) = watch::channel(0);
    let receiver = Receiver {
        spans: Arc::default(),
        metrics: Arc::default(),
        exports,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .add_service(MetricsServiceServer::new(receiver.clone()))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async {
                let _ = stopped.await;
            },
        );
    tokio::spawn(server);
    (receiver, format!("http://{addr}"), stop)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_is_one_trace_across_cli_broker_vault_and_audit_with_metrics_and_no_secrets() {
    let (receiver, endpoint, _stop) = start_receiver().await;
    let sys = System::start_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
    ]);

    // Enroll, request, approve, verify over gRPC.
    sys.enroll().await;
    let (verified, pin) = sys
        .verified_request_with_pin("rotate the root access keys")
        .await;
    let id = verified.request_id;

    // The release, by the real CLI, inside a trace the caller started.
    let cli = tokio::task::spawn_blocking({
        let config = sys.local.config.clone();
        let id = id.clone();
        move || {
            Command::new(bin_dir().join("twokey"))
                .env("TWOKEY_CONFIG", &config)
                .env("TRACEPARENT", format!("00-{TRACE_ID}-{ROOT_SPAN}-01"))
                .args(["--profile", "olivia", "--json", "code", "release", &id])
                .output()
                .expect("run twokey")
        }
    })
    .await
    .unwrap();
    assert!(
        cli.status.success(),
        "twokey code release failed: {}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&cli.stdout).expect("JSON answer");
    let code = answer["code"]["code"].as_str().expect("a code").to_owned();
    let codes = codes_around_now();
    assert!(
        codes.contains(&code),
        "the CLI's code is not a TOTP of the seed"
    );

    // Spans: CLI → broker server → broker client → vault server → audit.
    let in_trace = |r: &Receiver| {
        let all: Vec<Span> = spans(r)
            .into_iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .collect();
        let has =
            |service: &str, name: &str| all.iter().any(|s| s.service == service && s.name == name);
        (has(
            "twokey-broker",
            "twokey.broker.v1.BrokerService/ReleaseCode",
        ) && has("twokey-vault", "twokey.vault.v1.VaultService/GenerateCode")
            && has("twokey-audit", "store code.released"))
        .then_some(all)
    };
    let trace = receiver.wait_for("the release's spans", in_trace).await;
    let find = |service: &str, name: &str, kind: SpanKind| -> Span {
        trace
            .iter()
            .find(|s| s.service == service && s.name == name && s.kind == kind as i32)
            .unwrap_or_else(|| panic!("no {service} span {name} ({kind:?}) in {trace:#?}"))
            .clone()
    };
    let broker = find(
        "twokey-broker",
        "twokey.broker.v1.BrokerService/ReleaseCode",
        SpanKind::Server,
    );
    assert_eq!(
        broker.parent, ROOT_SPAN,
        "the broker's span is the CLI's child"
    );
    assert_eq!(
        broker.attributes["twokey.caller"],
        "spiffe://twokey.local/user/olivia"
    );
    assert_eq!(broker.attributes["twokey.request_id"], id);
    assert_eq!(broker.attributes["rpc.system"], "grpc");
    let client = find(
        "twokey-broker",
        "twokey.vault.v1.VaultService/GenerateCode",
        SpanKind::Client,
    );
    // The client span descends from the broker's server span.
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut ancestor = client.parent.as_str();
    while ancestor != broker.span_id {
        ancestor = by_id
            .get(ancestor)
            .map(|s| s.parent.as_str())
            .unwrap_or_else(|| panic!("the vault client span does not descend from ReleaseCode"));
    }
    let vault = find(
        "twokey-vault",
        "twokey.vault.v1.VaultService/GenerateCode",
        SpanKind::Server,
    );
    assert_eq!(
        vault.parent, client.span_id,
        "the vault's span is the broker client's child"
    );
    assert_eq!(
        vault.attributes["twokey.caller"],
        "spiffe://twokey.local/svc/broker"
    );
    assert_eq!(vault.attributes["twokey.account_id"], ACCOUNT);
    let stored = trace
        .iter()
        .find(|s| {
            s.service == "twokey-audit"
                && s.name == "store code.released"
                && s.attributes.get("twokey.source").map(String::as_str)
                    == Some("spiffe://twokey.local/svc/vault")
        })
        .expect("audit's span for the vault's code.released");
    assert_eq!(
        stored.parent, vault.span_id,
        "audit stores the event as the vault span's child"
    );

    // The audit event carries the trace and the vault span.
    let log = sys.log().await;
    let released = log
        .iter()
        .filter_map(|e| e.event.as_ref())
        .find(|e| e.action == "code.released" && e.source.ends_with("/svc/vault"))
        .expect("the vault's code.released event");
    assert_eq!(released.trace_id, TRACE_ID);
    assert_eq!(released.span_id, vault.span_id);

    // Metrics.
    let metrics = receiver
        .wait_for("the metrics", |r| {
            let codes = counter(r, "twokey-vault", "twokey.vault.codes.released")?;
            let acks = histogram_count(r, "twokey-vault", "twokey.audit.ack.latency")?;
            let approvals = counter(r, "twokey-broker", "twokey.broker.approvals")?;
            let expiry = gauge(r, "twokey-audit", "twokey.certificate.expiry")?;
            let depth = gauge(r, "twokey-broker", "twokey.outbox.depth")?;
            (codes >= 1 && acks >= 1 && approvals >= 1).then_some((expiry, depth))
        })
        .await;
    assert!(metrics.0 > 86_400.0, "certificate expiry {} s", metrics.0);
    assert!(metrics.1 >= 0.0);
    let resource = receiver.metrics.lock().unwrap()[0]
        .resource
        .as_ref()
        .map(|r| attrs(&r.attributes))
        .unwrap();
    assert_eq!(resource["deployment.environment"], "e2e");

    // No secret anywhere.
    for s in received_strings(&receiver) {
        assert_no_secret("an exported span or metric", &s, &pin, &codes);
    }
    for svc in ["audit", "vault", "broker"] {
        let log = sys.service_log(svc);
        assert!(log.contains("listening"), "the {svc} log is empty: {log}");
        assert_no_secret(&format!("the {svc} log"), &log, &pin, &codes);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_stopped_by_sigterm_exports_what_it_still_held() {
    let (receiver, endpoint, _stop) = start_receiver().await;
    // Nothing leaves on a timer during this test: only the shutdown flush.
    let mut sys = System::start_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
    ]);
    sys.broker("alice")
        .who_am_i(twokey_proto::broker::v1::WhoAmIRequest {})
        .await
        .expect("whoami");
    let broker_spans = |r: &Receiver| {
        spans(r)
            .into_iter()
            .filter(|s| s.service == "twokey-broker")
            .collect::<Vec<_>>()
    };
    assert!(
        broker_spans(&receiver).is_empty(),
        "spans left before shutdown"
    );

    let pid = sys.local.pid("broker").expect("the broker runs");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    // A clean shutdown, not SIGTERM's default action (which exports nothing):
    // the handler is installed before the broker says it listens.
    let deadline = std::time::Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(exit) = sys.local.exited("broker") {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker still runs {DEADLINE:?} after SIGTERM; its log:\n{}",
            sys.service_log("broker")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        exit.success(),
        "the broker ended by {exit} after SIGTERM, not by a clean shutdown; its log:\n{}",
        sys.service_log("broker")
    );

    let whoami = receiver
        .wait_for("the broker's spans after SIGTERM", |r| {
            broker_spans(r)
                .into_iter()
                .find(|s| s.name == "twokey.broker.v1.BrokerService/WhoAmI")
        })
        .await;
    assert_eq!(
        whoami.attributes["twokey.caller"],
        "spiffe://twokey.local/user/alice"
    );
    let expiry = receiver
        .wait_for("the broker's metrics after SIGTERM", |r| {
            gauge(r, "twokey-broker", "twokey.certificate.expiry")
        })
        .await;
    assert!(expiry > 86_400.0, "certificate expiry {expiry} s");
}
