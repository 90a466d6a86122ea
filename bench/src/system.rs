//! The three services as processes on loopback over mTLS, started in order
//! (audit, vault, broker) from the bench's [`World`], with the clients each
//! role uses and the footprint of each start. A service on PostgreSQL counts
//! as started when its gRPC health says SERVING (its database migrated; the
//! audit service: holding the sequencer lease).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use twokey_proto::{
    audit::v1::{GetCheckpointRequest, audit_service_client::AuditServiceClient},
    broker::v1::{WhoAmIRequest, broker_service_client::BrokerServiceClient},
    vault::v1::{StatusRequest, vault_service_client::VaultServiceClient},
};

use crate::{postgres::Store, procs::Service, setup::World};

/// One start of one service: how long until it served and how much memory
/// it holds idle.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Footprint {
    /// `twokey-vault` and so on.
    pub service: String,
    /// What it held when started, e.g. `empty` or `10000 accounts`.
    pub condition: String,
    /// From spawn to its `listening on` line, ms.
    pub listening_ms: f64,
    /// From spawn to the first successful RPC, ms.
    pub first_rpc_ms: f64,
    /// Resident set size when idle after start, MiB.
    pub idle_rss_mib: f64,
    /// Resident set size after the load it served (0: not measured), MiB.
    pub loaded_rss_mib: f64,
}

/// Time an idle service is left before its RSS is read.
pub const SETTLE: Duration = Duration::from_millis(500);
const READY_LIMIT: Duration = Duration::from_secs(60);

/// Polls `probe` (bounded in time) until it succeeds; returns when it did.
pub async fn wait_ready<F, Fut>(mut probe: F) -> Result<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if probe().await {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("service not ready within {READY_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Whether `service` (e.g. `twokey.vault.v1.VaultService`) reports SERVING
/// on `channel`, when `store` is PostgreSQL; on sled the RPC the caller
/// probes with is enough.
async fn serving_on(store: Store, channel: Channel, service: &str) -> bool {
    if store == Store::Sled {
        return true;
    }
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

/// A running system.
#[derive(Debug)]
pub struct System {
    /// The audit process.
    pub audit: Service,
    /// The vault process.
    pub vault: Service,
    /// The broker process.
    pub broker: Service,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// One row per start.
    pub footprints: Vec<Footprint>,
}

fn log(world: &World, name: &str) -> PathBuf {
    world.dir().join(format!("{name}.log"))
}

/// Starts an audit process on `config` and waits until a checkpoint is served.
pub async fn start_audit(
    world: &World,
    bin_dir: &Path,
    config: &Path,
    condition: &str,
) -> Result<(Service, Footprint)> {
    let spawned = Instant::now();
    let svc = Service::start(bin_dir, "twokey-audit", config, &log(world, "audit"))?;
    let channel = world.channel("carol", &svc.address, "audit")?;
    let client = AuditServiceClient::new(channel.clone());
    // The scaling run's audit is on tiles whatever the world's store.
    let store = if config == world.config("audit") {
        world.stores.audit
    } else {
        Store::Sled
    };
    let ready = wait_ready(|| {
        let mut c = client.clone();
        let channel = channel.clone();
        async move {
            c.get_checkpoint(GetCheckpointRequest {}).await.is_ok()
                && serving_on(store, channel, "twokey.audit.v1.AuditService").await
        }
    })
    .await?;
    let fp = footprint(&svc, condition, spawned, ready).await?;
    Ok((svc, fp))
}

/// Starts the vault process and waits until Status answers.
pub async fn start_vault(
    world: &World,
    bin_dir: &Path,
    condition: &str,
) -> Result<(Service, Footprint)> {
    let spawned = Instant::now();
    let svc = Service::start(
        bin_dir,
        "twokey-vault",
        &world.config("vault"),
        &log(world, "vault"),
    )?;
    let channel = world.channel("broker", &svc.address, "vault")?;
    let client = VaultServiceClient::new(channel.clone());
    let store = world.stores.vault;
    let ready = wait_ready(|| {
        let mut c = client.clone();
        let channel = channel.clone();
        async move {
            c.status(StatusRequest {}).await.is_ok()
                && serving_on(store, channel, "twokey.vault.v1.VaultService").await
        }
    })
    .await?;
    let fp = footprint(&svc, condition, spawned, ready).await?;
    Ok((svc, fp))
}

async fn footprint(
    svc: &Service,
    condition: &str,
    spawned: Instant,
    ready: Instant,
) -> Result<Footprint> {
    tokio::time::sleep(SETTLE).await;
    Ok(Footprint {
        service: svc.name.clone(),
        condition: condition.into(),
        listening_ms: svc.started_in.as_secs_f64() * 1e3,
        first_rpc_ms: (ready - spawned).as_secs_f64() * 1e3,
        idle_rss_mib: svc.rss_kib()? as f64 / 1024.0,
        loaded_rss_mib: 0.0,
    })
}

/// The vault as the broker calls it.
pub fn vault_client(world: &World, address: &str) -> Result<VaultServiceClient<Channel>> {
    Ok(VaultServiceClient::new(
        world.channel("broker", address, "vault")?,
    ))
}

/// The broker as `user` calls it.
pub fn broker_client(
    world: &World,
    address: &str,
    user: &str,
) -> Result<BrokerServiceClient<Channel>> {
    Ok(BrokerServiceClient::new(
        world.channel(user, address, "broker")?,
    ))
}

impl System {
    /// Starts audit, vault and broker on fresh data.
    pub async fn start(world: &World, bin_dir: &Path) -> Result<Self> {
        let (audit, fa) = start_audit(world, bin_dir, &world.config("audit"), "empty").await?;
        world.write_vault_config(&audit.address, "127.0.0.1:0")?;
        let (vault, fv) = start_vault(world, bin_dir, "empty").await?;
        world.write_broker_config(&vault.address, &audit.address)?;
        let spawned = Instant::now();
        let broker = Service::start(
            bin_dir,
            "twokey-broker",
            &world.config("broker"),
            &log(world, "broker"),
        )?;
        let channel = world.channel("alice", &broker.address, "broker")?;
        let client = BrokerServiceClient::new(channel.clone());
        let store = world.stores.broker;
        let ready = wait_ready(|| {
            let mut c = client.clone();
            let channel = channel.clone();
            async move {
                c.who_am_i(WhoAmIRequest {}).await.is_ok()
                    && serving_on(store, channel, "twokey.broker.v1.BrokerService").await
            }
        })
        .await
        .context("broker")?;
        let fb = footprint(&broker, "empty", spawned, ready).await?;
        Ok(Self {
            audit,
            vault,
            broker,
            bin_dir: bin_dir.to_owned(),
            footprints: vec![fa, fv, fb],
        })
    }

    /// Records each process's RSS after the load it served.
    pub fn record_loaded_rss(&mut self) -> Result<()> {
        for fp in &mut self.footprints {
            let svc = match fp.service.as_str() {
                "twokey-audit" => &self.audit,
                "twokey-vault" => &self.vault,
                _ => &self.broker,
            };
            if fp.condition == "empty" {
                fp.loaded_rss_mib = svc.rss_kib()? as f64 / 1024.0;
            }
        }
        Ok(())
    }

    /// Restarts the vault on the same data and port; records its start.
    pub async fn restart_vault(&mut self, world: &World, condition: &str) -> Result<Footprint> {
        let port = self
            .vault
            .address
            .rsplit(':')
            .next()
            .context("vault address has a port")?
            .to_owned();
        self.vault.kill();
        world.write_vault_config(&self.audit.address, &format!("127.0.0.1:{port}"))?;
        let (vault, fp) = start_vault(world, &self.bin_dir, condition).await?;
        self.vault = vault;
        self.footprints.push(fp.clone());
        Ok(fp)
    }
}
