//! What the services' PostgreSQL stores share besides connecting: a few
//! sessions reopened when found closed ([`Sessions`]), each with
//! `synchronous_commit = on` so that a commit is an acknowledgement, and a
//! runtime of their own for stores whose trait is synchronous
//! ([`StoreRuntime`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::Client;

use crate::{PgError, PgSettings, connect};

/// A few sessions, each reopened when it is found closed.
pub struct Sessions {
    settings: PgSettings,
    slots: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("settings", &self.settings)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Up to `count` (at least one) sessions with `settings`, opened when
    /// first needed.
    pub fn new(settings: PgSettings, count: usize) -> Self {
        Self {
            settings,
            slots: (0..count.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The settings the sessions connect with.
    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    /// A session to use alone until the guard drops: a free one if there is
    /// one, else the next in turn once it is free; (re)opened if closed.
    /// The guard holds `Some` client when this answers; a caller that finds
    /// the session broken sets it to `None` so the next caller opens anew.
    pub async fn get(&self) -> Result<MutexGuard<'_, Option<Client>>, PgError> {
        let mut guard = None;
        for slot in &self.slots {
            if let Ok(g) = slot.try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                self.slots[i].lock().await
            }
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            let client = connect(&self.settings).await?;
            // A commit is the acknowledgement: durable whatever the
            // server's or the role's default says.
            client.batch_execute("SET synchronous_commit = on").await?;
            *guard = Some(client);
        }
        Ok(guard)
    }
}

/// A multi-thread runtime of a store's own, for the synchronous methods of
/// a store trait that call PostgreSQL from inside the service's runtime;
/// shut down in the background when dropped (a runtime cannot be dropped
/// inside another's task).
#[derive(Debug)]
pub struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl StoreRuntime {
    /// Two worker threads named `name`.
    pub fn new(name: &str) -> Result<Self, PgError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
            .map_err(|e| PgError::Setting(format!("cannot start the PostgreSQL runtime: {e}")))
    }

    /// Where to spawn the store's work.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("taken only on drop").handle()
    }
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
