//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go's `leaderelection` does it.
//!
//! Every replica serves xDS; only the leader writes Ingress status, so two replicas never fight over it.
//! Each replica, every `retry_period`:
//! - no Lease: create it holding it (a create race is lost with `409 AlreadyExists`);
//! - held by us: renew (`renewTime` = now);
//! - held by another, or released (`holderIdentity` empty): take it when released, or when the record has not
//!   changed for `lease_duration` *as measured by our own clock since we first saw that record* (as client-go
//!   does: clocks of replicas are never compared, so skew cannot make two leaders).
//!
//! Every write is a `replace` carrying the `resourceVersion` we read, so of two replicas taking an expired Lease at
//! once, one gets `409 Conflict` and stays a follower; a leader whose renewal gets `409` (the Lease was written
//! by someone else since its read) retries on the next period and stays leader meanwhile. A leader that cannot
//! renew for `renew_deadline` (shorter than `lease_duration`) steps down before anyone else may take over. On shutdown the leader releases the Lease
//! (empty holder, 1 s duration), so the next leader does not wait out the lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use mesh_runtime::Shutdown;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Errors talking to the Lease; each is retried on the next period.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API call failed (down, forbidden: check the Role granting get/create/update on leases).
    #[error(
        "Lease {namespace}/{name}: {error} (check the API server and the Role granting get, create and update on leases)"
    )]
    Api {
        /// Namespace of the Lease.
        namespace: String,
        /// Its name.
        name: String,
        /// What the API said.
        error: kube::Error,
    },
    /// Our renewal was refused as stale: the Lease changed between our read and our write. Retried on the next
    /// period; we stay leader until the renew deadline, as client-go does (the next read tells whether another
    /// replica took it).
    #[error("Lease {namespace}/{name} changed between our read and our renewal (409 Conflict); retrying")]
    RenewConflict {
        /// Namespace of the Lease.
        namespace: String,
        /// Its name.
        name: String,
    },
}

/// Which Lease, who we are, and the timing (client-go's defaults: 15 s / 10 s / 2 s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The Lease's name.
    pub name: String,
    /// The Lease's namespace.
    pub namespace: String,
    /// Our identity in `holderIdentity` (the Pod name).
    pub identity: String,
    /// How long a Lease not renewed stays held by its holder (written in whole seconds, rounded up).
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down; shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often every replica tries to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// A Lease with client-go's default timing.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether we lead, as it changes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// The sender of a [`Leadership::fixed`], kept so that `changed` never reports an end.
    _fixed: Option<std::sync::Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// Whether we hold the Lease now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until leadership changes (returns at once if it changed since last seen); `false` once the elector
    /// has stopped.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// A leadership fixed to `leader`, for a writer that needs no election (tests, a single replica).
    pub fn fixed(leader: bool) -> Self {
        let (tx, rx) = watch::channel(leader);
        Leadership { rx, _fixed: Some(std::sync::Arc::new(tx)) }
    }
}

/// Starts the elector; it runs until `shutdown`, then releases the Lease if it holds it.
pub fn spawn(
    client: kube::Client,
    settings: LeaseSettings,
    shutdown: Shutdown,
    metrics: crate::source::kubernetes::KubeMetrics,
) -> (Leadership, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    metrics.set_leader(false);
    let task = tokio::spawn(async move {
        let mut e = Elector::new(Api::namespaced(client, &settings.namespace), settings);
        let mut last_renew: Option<Instant> = None;
        let mut failing = false;
        loop {
            let round = e.try_acquire_or_renew().await;
            if round.is_ok() {
                failing = false;
            }
            match round {
                Ok(true) => {
                    last_renew = Some(Instant::now());
                    if !*tx.borrow() {
                        info!(lease = %e.settings.name, identity = %e.settings.identity, "became leader");
                    }
                    tx.send_if_modified(|l| !std::mem::replace(l, true));
                    metrics.set_leader(true);
                }
                Ok(false) => {
                    if *tx.borrow() {
                        info!(lease = %e.settings.name, "lost leadership to another replica");
                    }
                    last_renew = None;
                    tx.send_if_modified(|l| std::mem::replace(l, false));
                    metrics.set_leader(false);
                }
                Err(err) => {
                    // One warning per outage, then debug: the elector retries every period.
                    if failing {
                        debug!("{err}");
                    } else {
                        warn!("{err}");
                    }
                    failing = true;
                    if last_renew.is_some_and(|t| t.elapsed() >= e.settings.renew_deadline) {
                        warn!(lease = %e.settings.name, "could not renew within the renew deadline; stepping down");
                        last_renew = None;
                        tx.send_if_modified(|l| std::mem::replace(l, false));
                        metrics.set_leader(false);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(e.settings.retry_period) => {}
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            metrics.set_leader(false);
            match e.release().await {
                Ok(()) => info!(lease = %e.settings.name, "released leadership"),
                Err(err) => warn!("releasing: {err}"),
            }
        }
    });
    (Leadership { rx, _fixed: None }, task)
}

/// What we last saw of the Lease, and when (by our clock).
type Observed = (Option<String>, Option<MicroTime>, Option<i32>);

struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<(Observed, Instant)>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Whole seconds for `leaseDurationSeconds`, rounded up: others must never wait less than we assume.
fn secs(d: Duration) -> i32 {
    let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(whole.max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        Elector { api, settings, observed: None }
    }

    fn err(&self, error: kube::Error) -> LeaseError {
        LeaseError::Api { namespace: self.settings.namespace.clone(), name: self.settings.name.clone(), error }
    }

    /// One round: `Ok(true)` when we hold the Lease after it.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let me = self.settings.identity.clone();
        let Some(lease) = self.api.get_opt(&self.settings.name).await.map_err(|e| self.err(e))? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.settings.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(secs(self.settings.lease_duration)),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record: Observed = (holder.clone(), spec.renew_time.clone(), spec.lease_transitions);
        let seen_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                self.observed = Some((record, Instant::now()));
                Instant::now()
            }
        };
        let held_by_us = holder.as_deref() == Some(me.as_str());
        if !held_by_us && holder.is_some() {
            let duration = spec.lease_duration_seconds.and_then(|s| u64::try_from(s).ok()).map(Duration::from_secs);
            if seen_at.elapsed() < duration.unwrap_or(self.settings.lease_duration) {
                debug!(holder = ?holder, "Lease held by another replica");
                return Ok(false);
            }
            info!(holder = ?holder, "Lease expired; taking it");
        }
        let mut new_spec = spec;
        new_spec.renew_time = Some(now());
        new_spec.lease_duration_seconds = Some(secs(self.settings.lease_duration));
        if !held_by_us {
            new_spec.holder_identity = Some(me);
            new_spec.acquire_time = Some(now());
            new_spec.lease_transitions = Some(new_spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        // The resourceVersion we read is kept in `metadata`: the API server refuses the write with 409 if the Lease
        // changed since, so only one of two racing replicas wins.
        let update = Lease { metadata: lease.metadata, spec: Some(new_spec) };
        match self.api.replace(&self.settings.name, &PostParams::default(), &update).await {
            Ok(_) => Ok(true),
            // A renewal refused as stale is not a lost Lease (found against a real API server: any write to the
            // Lease between our read and our write, a `kubectl annotate` say, made the leader step down).
            Err(kube::Error::Api(s)) if s.code == 409 && held_by_us => Err(LeaseError::RenewConflict {
                namespace: self.settings.namespace.clone(),
                name: self.settings.name.clone(),
            }),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Gives the Lease up if we hold it: empty holder, 1 s duration.
    async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(lease) = self.api.get_opt(&self.settings.name).await.map_err(|e| self.err(e))? else { return Ok(()) };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        spec.acquire_time = Some(now());
        let update = Lease { metadata: lease.metadata, spec: Some(spec) };
        match self.api.replace(&self.settings.name, &PostParams::default(), &update).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fake::FakeApi;
    use serde_json::Value;

    fn fast(identity: &str) -> LeaseSettings {
        let mut s = LeaseSettings::new("race", "mesh-system", identity);
        s.lease_duration = Duration::from_secs(1);
        s.renew_deadline = Duration::from_millis(600);
        s.retry_period = Duration::from_millis(20);
        s
    }

    #[tokio::test]
    async fn replicas_starting_together_elect_exactly_one() {
        let fake = FakeApi::new();
        let shutdown = Shutdown::new();
        let electors: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| {
                spawn(fake.client(), fast(id), shutdown.clone(), crate::source::kubernetes::KubeMetrics::default())
            })
            .collect();
        let leaders = || electors.iter().filter(|(l, _)| l.is_leader()).count();
        mesh_tests::assert_eventually!(within Duration::from_secs(10), leaders() > 0, "somebody leads");
        // Many renewal rounds later, still exactly one, and the Lease names it.
        let stop = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < stop {
            assert_eq!(leaders(), 1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lease = fake.get("coordination.k8s.io/v1", "Lease", "mesh-system", "race").unwrap();
        let holder = lease["spec"]["holderIdentity"].as_str().unwrap().to_owned();
        let leader = ["a", "b", "c"].iter().zip(&electors).find(|(_, (l, _))| l.is_leader()).unwrap().0;
        assert_eq!(holder, *leader);
        assert_eq!(lease["spec"]["leaseTransitions"], 0);
        assert!(fake.calls().iter().filter(|c| c.verb == "create").count() >= 1);
        shutdown.trigger();
        for (_, task) in electors {
            task.await.unwrap();
        }
        let lease = fake.get("coordination.k8s.io/v1", "Lease", "mesh-system", "race").unwrap();
        assert!(lease["spec"].get("holderIdentity").is_none_or(Value::is_null), "released: {lease}");
    }
}
