//! Who gets a connection: the server-wide limit (`--max-connections`), the limit per source
//! (`--max-connections-per-client`), and which connection makes room when one is reached.
//!
//! A connection that has not finished its handshake has given nothing the server cares
//! about, and one that never will (a flood of half-open connections) would otherwise hold
//! its place until the handshake timeout, locking real clients out for that long. So when
//! a limit is reached, the connection that has been in the handshake longest (from the
//! same source, for the per-source limit) is dropped for the new one. Connections in the
//! transmission phase are never dropped for another: beyond the limits, new ones wait (in
//! the kernel's accept queue, or for a free slot) or are refused, as before.

use super::transmission::ClientBudget;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Connections dropped in the handshake to make room, since the process started (all its
/// servers together: the metrics describe the daemon).
static EVICTIONS: AtomicU64 = AtomicU64::new(0);

/// How many connections were dropped in the handshake to make room for newer ones.
pub(crate) fn evictions() -> u64 {
    EVICTIONS.load(Ordering::Relaxed)
}

/// The limits and the connections counted against them.
pub(super) struct Admission {
    max_per_client: usize,
    client_inflight_bytes: usize,
    /// One permit per connection served at once.
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per source: connections counted, and the in-flight budget they share.
    per_client: HashMap<String, (usize, ClientBudget)>,
    /// Connections still in the handshake, by id: ids grow, so the oldest comes first.
    handshaking: BTreeMap<u64, Pending>,
    next_id: u64,
}

struct Pending {
    key: String,
    peer: String,
    since: Instant,
    /// Cancelled to drop the connection.
    evict: CancellationToken,
}

/// A connection counted against its source; uncounted when dropped (or when it is evicted,
/// so that the one admitted in its place counts at once).
pub(super) struct ClientSlot {
    admission: Arc<Admission>,
    id: u64,
    key: String,
    /// The source's in-flight budget.
    pub(super) budget: ClientBudget,
    /// Cancelled when the connection is dropped to make room for a newer one.
    pub(super) evicted: CancellationToken,
}

impl Admission {
    /// At most `max_connections` at once, `max_per_client` of them from one source, whose
    /// connections share `client_inflight_bytes` of in-flight budget.
    pub(super) fn new(
        max_connections: usize,
        max_per_client: usize,
        client_inflight_bytes: usize,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            max_per_client,
            client_inflight_bytes,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A server-wide slot for `peer`, just accepted: at once if one is free; else the
    /// connection longest in the handshake is dropped for it, or (none is) it waits for a
    /// connection to end. `None` once the semaphore is closed.
    pub(super) async fn slot(&self, peer: &str) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        {
            let mut st = self.lock();
            let oldest = st.handshaking.keys().next().copied();
            if let Some(id) = oldest {
                evict(&mut st, id, peer, "--max-connections");
            }
        }
        // The evicted connection gives its slot back as its task ends, at once.
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Counts a connection from `key` (described as `peer`), as in the handshake. When the
    /// source has its fill, its connection longest in the handshake is dropped for this
    /// one; `None` if all of them are past the handshake.
    pub(super) fn admit(self: &Arc<Self>, key: String, peer: &str) -> Option<ClientSlot> {
        let mut st = self.lock();
        let full = st
            .per_client
            .get(&key)
            .is_some_and(|(n, _)| *n >= self.max_per_client);
        if full {
            let oldest = st
                .handshaking
                .iter()
                .find(|(_, p)| p.key == key)
                .map(|(id, _)| *id)?;
            evict(&mut st, oldest, peer, "--max-connections-per-client");
        }
        let budget = {
            let (n, budget) = st
                .per_client
                .entry(key.clone())
                .or_insert_with(|| (0, ClientBudget::new(self.client_inflight_bytes)));
            *n += 1;
            budget.clone()
        };
        let id = st.next_id;
        st.next_id += 1;
        let evicted = CancellationToken::new();
        st.handshaking.insert(
            id,
            Pending {
                key: key.clone(),
                peer: peer.to_string(),
                since: Instant::now(),
                evict: evicted.clone(),
            },
        );
        Some(ClientSlot {
            admission: self.clone(),
            id,
            key,
            budget,
            evicted,
        })
    }
}

/// Drops the connection `id`, still in the handshake, to make room for `for_peer` under
/// `limit`: it is uncounted here, and its task ends when it sees the token cancelled.
fn evict(st: &mut State, id: u64, for_peer: &str, limit: &str) {
    let Some(p) = st.handshaking.remove(&id) else {
        return;
    };
    uncount(st, &p.key);
    p.evict.cancel();
    EVICTIONS.fetch_add(1, Ordering::Relaxed);
    info!(
        "client {} evicted: still in the handshake after {:.1}s when {for_peer} came and \
         {limit} was reached",
        p.peer,
        p.since.elapsed().as_secs_f32()
    );
}

fn uncount(st: &mut State, key: &str) {
    if let Some((n, _)) = st.per_client.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            st.per_client.remove(key);
        }
    }
}

impl ClientSlot {
    /// The handshake is done: the connection is no longer dropped to make room. False if
    /// it was dropped just before: the connection must end.
    pub(super) fn established(&self) -> bool {
        let mut st = self.admission.lock();
        // Eviction cancels under this lock: either it came first, or it will pass over us.
        if self.evicted.is_cancelled() {
            return false;
        }
        st.handshaking.remove(&self.id);
        true
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut st = self.admission.lock();
        // An evicted connection was uncounted when it was evicted.
        if self.evicted.is_cancelled() {
            return;
        }
        st.handshaking.remove(&self.id);
        uncount(&mut st, &self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_in_the_handshake_makes_room() {
        let a = Admission::new(3, 2, 1 << 20);
        let s1 = a.admit("x".into(), "x:1").unwrap();
        let s2 = a.admit("x".into(), "x:2").unwrap();
        // Source x is full: its oldest (s1) goes for the third.
        let s3 = a.admit("x".into(), "x:3").unwrap();
        assert!(s1.evicted.is_cancelled() && !s2.evicted.is_cancelled());
        drop(s1);
        // Past the handshake, s2 and s3 stay: a fourth from x is refused.
        assert!(s2.established() && s3.established());
        assert!(a.admit("x".into(), "x:4").is_none());
        let y = a.admit("y".into(), "y:1").unwrap();
        drop(s3);
        let z = a.admit("x".into(), "x:5").unwrap();
        assert!(!y.evicted.is_cancelled() && !z.evicted.is_cancelled());

        // Server-wide: three slots held; the fourth takes the place of the oldest
        // connection still in the handshake (y), whose task gives its slot back.
        let held: Vec<_> = (0..3)
            .map(|_| a.slots.clone().try_acquire_owned().unwrap())
            .collect();
        let mut held = held.into_iter();
        let (first, rest): (OwnedSemaphorePermit, Vec<_>) = (held.next().unwrap(), held.collect());
        let waiting = a.slot("w:1");
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        assert!(y.evicted.is_cancelled() && !z.evicted.is_cancelled());
        drop(first);
        assert!(waiting.await.is_some());
        drop(rest);
    }
}
