//! Metrics through the OpenTelemetry metrics API: instruments shared by the
//! three services (outbox depth, audit acknowledgement latency, events
//! acknowledged, certificate expiry) and the counters each service records
//! from its thin layers. Exported over OTLP when [`crate::telemetry::init`]
//! found an endpoint; otherwise every instrument is a no-op.
//! docs/OBSERVABILITY.md lists each metric and what to alert on.

use std::{
    path::Path,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter},
};

/// The meter every twokey instrument comes from.
pub fn meter() -> Meter {
    opentelemetry::global::meter("twokey")
}

struct Shared {
    events: Counter<u64>,
    ack_latency: Histogram<f64>,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let m = meter();
        Shared {
            events: m
                .u64_counter("twokey.events")
                .with_description(
                    "audit events acknowledged by the audit service, by action and outcome",
                )
                .with_unit("{event}")
                .build(),
            ack_latency: m
                .f64_histogram("twokey.audit.ack.latency")
                .with_description("time from sending an audit event to its durable acknowledgement")
                .with_unit("s")
                .with_boundaries(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .build(),
        }
    })
}

/// One event of `source` acknowledged after `latency` (shipper).
pub fn event_acknowledged(source: &str, action: &str, outcome: &str, latency: Duration) {
    let s = shared();
    s.events.add(
        1,
        &[
            KeyValue::new("source", source.to_owned()),
            KeyValue::new("action", action.to_owned()),
            KeyValue::new("outcome", outcome.to_owned()),
        ],
    );
    s.ack_latency.record(
        latency.as_secs_f64(),
        &[KeyValue::new("source", source.to_owned())],
    );
}

/// Reports `depth()` as `twokey.outbox.depth` for `source`, at each export.
pub fn observe_outbox_depth(source: String, depth: impl Fn() -> usize + Send + Sync + 'static) {
    let attrs = [KeyValue::new("source", source)];
    meter()
        .u64_observable_gauge("twokey.outbox.depth")
        .with_description("audit events written but not yet acknowledged by the audit service")
        .with_unit("{event}")
        .with_callback(move |gauge| gauge.observe(depth() as u64, &attrs))
        .build();
}

/// The `notAfter` time of the first certificate in the PEM file `path`.
pub fn certificate_not_after(path: &Path) -> Result<SystemTime, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| format!("{} is not a PEM certificate: {e}", path.display()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("{} is not an X.509 certificate: {e}", path.display()))?;
    let secs = cert.validity().not_after.timestamp();
    let secs = u64::try_from(secs).unwrap_or(0);
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Reports the seconds left before the service's own certificate (the PEM
/// file `path`) expires, as `twokey.certificate.expiry`; negative once
/// expired. A certificate that cannot be read is logged and not reported.
pub fn observe_certificate_expiry(service: &str, path: &Path) {
    let not_after = match certificate_not_after(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("certificate expiry not reported: {e}");
            return;
        }
    };
    let attrs = [
        KeyValue::new("service", service.to_owned()),
        KeyValue::new("certificate", path.display().to_string()),
    ];
    meter()
        .f64_observable_gauge("twokey.certificate.expiry")
        .with_description("seconds left before the service's own TLS certificate expires")
        .with_unit("s")
        .with_callback(move |gauge| {
            let left = match not_after.duration_since(SystemTime::now()) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            gauge.observe(left, &attrs);
        })
        .build();
}

/// A counter named `name` (e.g. `twokey.broker.approvals`).
pub fn counter(name: &'static str, description: &'static str, unit: &'static str) -> Counter<u64> {
    meter()
        .u64_counter(name)
        .with_description(description)
        .with_unit(unit)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_expiry_of_a_pem_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["vault".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2040, 1, 2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        let t = certificate_not_after(&path).unwrap();
        // 2040-01-02T00:00:00Z
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            2_209_075_200
        );
        assert!(certificate_not_after(&dir.path().join("missing.pem")).is_err());
        std::fs::write(&path, "not pem").unwrap();
        assert!(certificate_not_after(&path).is_err());
    }
}
