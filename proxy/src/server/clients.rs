//! What the admin console knows about clients: the registry of connected
//! clients (`SHOW CLIENTS`, the active half of `SHOW SERVERS`) and the
//! pause gate (`PAUSE` / `RESUME`). Neither is touched on a session's hot
//! path beyond one atomic load per transaction.
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use super::settings::UserEntry;
use crate::backend::CancelTarget;

/// Where a session's current query can be cancelled (and which server
/// connection it holds).
pub type CancelSlot = Mutex<Option<CancelTarget>>;

/// One connected client. Kept small: every idle client has one (the
/// strings it shares with the configuration are read from `entry`).
#[derive(Debug)]
pub struct ClientStatus {
    /// The connection id (also in every log line of the connection).
    pub id: u64,
    /// The client user's configuration as it was at login (its `name` is
    /// the client user, `server_user` the user the proxy logs in to
    /// servers as for it).
    pub entry: Arc<UserEntry>,
    /// The database it asked for.
    pub database: Box<str>,
    /// Its address.
    pub peer: SocketAddr,
    /// Whether it uses TLS.
    pub tls: bool,
    /// Its `application_name`.
    pub application_name: Box<str>,
    /// When it connected.
    pub connected_at: SystemTime,
    /// The server connection it holds, if any (where its current query can
    /// be cancelled).
    pub server: CancelSlot,
    /// True while it waits for `RESUME`.
    pub waiting: AtomicBool,
}

impl ClientStatus {
    /// A client that just logged in as `entry`'s user, connected now.
    pub fn new(
        id: u64,
        entry: Arc<UserEntry>,
        database: &str,
        peer: SocketAddr,
        tls: bool,
        application_name: &str,
    ) -> ClientStatus {
        ClientStatus {
            id,
            entry,
            database: database.into(),
            peer,
            tls,
            application_name: application_name.into(),
            connected_at: SystemTime::now(),
            server: Mutex::new(None),
            waiting: AtomicBool::new(false),
        }
    }

    /// The client user.
    pub fn user(&self) -> &str {
        &self.entry.name
    }

    /// The user the proxy logs in to servers as for this client.
    pub fn server_user(&self) -> &str {
        &self.entry.server_user
    }
}

/// The connected clients, by id.
#[derive(Default)]
pub struct ClientRegistry {
    clients: Mutex<BTreeMap<u64, Arc<ClientStatus>>>,
}

/// Removes a client from the registry when dropped.
pub struct Registration {
    registry: Arc<ClientRegistry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .clients
            .lock()
            .expect("client registry")
            .remove(&self.id);
    }
}

impl ClientRegistry {
    /// Adds a client until the registration drops.
    pub fn register(self: &Arc<Self>, status: Arc<ClientStatus>) -> Registration {
        let id = status.id;
        self.clients
            .lock()
            .expect("client registry")
            .insert(id, status);
        Registration {
            registry: self.clone(),
            id,
        }
    }

    /// Every client, by id.
    pub fn list(&self) -> Vec<Arc<ClientStatus>> {
        self.clients
            .lock()
            .expect("client registry")
            .values()
            .cloned()
            .collect()
    }
}

/// Which databases are paused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Paused {
    /// Every database.
    pub all: bool,
    /// These databases.
    pub databases: BTreeSet<String>,
}

impl Paused {
    /// Whether new transactions on `database` must wait.
    pub fn covers(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }
}

/// `PAUSE` / `RESUME`: sessions wait before starting a transaction on a
/// paused database.
pub struct PauseGate {
    state: watch::Sender<Paused>,
    any: AtomicBool,
}

impl Default for PauseGate {
    fn default() -> Self {
        PauseGate {
            state: watch::Sender::new(Paused::default()),
            any: AtomicBool::new(false),
        }
    }
}

impl PauseGate {
    /// Pauses `database`, or every database.
    pub fn pause(&self, database: Option<&str>) {
        self.state.send_modify(|p| match database {
            Some(d) => {
                p.databases.insert(d.to_string());
            }
            None => p.all = true,
        });
        self.any.store(true, Ordering::SeqCst);
    }

    /// Resumes `database`, or everything. Returns false when it was not
    /// paused.
    pub fn resume(&self, database: Option<&str>) -> bool {
        let mut was = false;
        self.state.send_modify(|p| match database {
            Some(d) => {
                was = p.databases.remove(d) || p.all;
                if p.all {
                    // Resuming one database of a global pause: the others
                    // stay paused. Not tracked per database; refuse.
                    was = false;
                }
            }
            None => {
                was = p.all || !p.databases.is_empty();
                *p = Paused::default();
            }
        });
        let any = {
            let p = self.state.borrow();
            p.all || !p.databases.is_empty()
        };
        self.any.store(any, Ordering::SeqCst);
        was
    }

    /// What is paused now.
    pub fn paused(&self) -> Paused {
        self.state.borrow().clone()
    }

    /// Whether `database` is paused now (one atomic load when nothing is).
    pub fn is_paused(&self, database: &str) -> bool {
        self.any.load(Ordering::SeqCst) && self.state.borrow().covers(database)
    }

    /// Waits until `database` is not paused.
    pub async fn wait(&self, database: &str) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|p| !p.covers(database)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pause_and_resume_one_database_or_all() {
        let g = PauseGate::default();
        assert!(!g.is_paused("app"));
        g.pause(Some("app"));
        assert!(g.is_paused("app"));
        assert!(!g.is_paused("other"));
        assert!(g.resume(Some("app")));
        assert!(!g.is_paused("app"));
        assert!(!g.resume(Some("app")), "not paused any more");
        g.pause(None);
        assert!(g.is_paused("other"));
        let waiter = tokio::spawn({
            let rx = g.state.subscribe();
            async move {
                let mut rx = rx;
                rx.wait_for(|p| !p.covers("other")).await.is_ok()
            }
        });
        assert!(!waiter.is_finished());
        assert!(g.resume(None));
        assert!(waiter.await.unwrap());
        assert!(!g.is_paused("other"));
    }

    #[test]
    fn registry_forgets_dropped_clients() {
        let r = Arc::new(ClientRegistry::default());
        let entry = Arc::new(UserEntry {
            name: "u".into(),
            auth: crate::config::AuthMethod::Trust,
            password: String::new(),
            scram: None,
            server_user: "u".into(),
            server_password: None,
            consistency: None,
        });
        let status = |id| {
            Arc::new(ClientStatus::new(
                id,
                entry.clone(),
                "d",
                "127.0.0.1:1".parse().unwrap(),
                false,
                "",
            ))
        };
        let a = r.register(status(1));
        let _b = r.register(status(2));
        assert_eq!(r.list().iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2]);
        drop(a);
        assert_eq!(r.list().iter().map(|c| c.id).collect::<Vec<_>>(), [2]);
    }
}
