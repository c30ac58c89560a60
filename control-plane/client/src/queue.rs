//! Work queues for level-triggered loops: a key is queued at most once, never processed by two
//! workers at a time (a key that changes while processed is processed again after), and keys
//! that failed come back with exponential backoff.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt::Display,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

struct State<T> {
    queue: VecDeque<T>,
    queued: HashSet<T>,
    processing: HashSet<T>,
    /// Added while processing: queued again when done.
    dirty: HashSet<T>,
    failures: HashMap<T, u32>,
}

pub struct Queue<T> {
    state: Mutex<State<T>>,
    ready: Notify,
}

impl<T: Hash + Eq + Clone + Send + Sync + 'static> Queue<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued: HashSet::new(),
                processing: HashSet::new(),
                dirty: HashSet::new(),
                failures: HashMap::new(),
            }),
            ready: Notify::new(),
        })
    }

    pub fn add(&self, item: T) {
        let mut state = self.state.lock().expect("not poisoned");
        if state.processing.contains(&item) {
            state.dirty.insert(item);
        } else if state.queued.insert(item.clone()) {
            state.queue.push_back(item);
            drop(state);
            self.ready.notify_one();
        }
    }

    pub fn add_after(self: &Arc<Self>, item: T, delay: Duration) {
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.add(item);
        });
    }

    /// Queues `item` again after a delay that doubles with each failure in a row (5 ms to 30 s).
    pub fn retry(self: &Arc<Self>, item: T) {
        let failures = {
            let mut state = self.state.lock().expect("not poisoned");
            let n = state.failures.entry(item.clone()).or_insert(0);
            *n += 1;
            *n
        };
        self.add_after(item, backoff(failures, Duration::from_millis(5)));
    }

    /// The next key to process; call [`Queue::done`] after.
    pub async fn next(&self) -> T {
        loop {
            {
                let mut state = self.state.lock().expect("not poisoned");
                if let Some(item) = state.queue.pop_front() {
                    state.queued.remove(&item);
                    state.processing.insert(item.clone());
                    if !state.queue.is_empty() {
                        self.ready.notify_one();
                    }
                    return item;
                }
            }
            self.ready.notified().await;
        }
    }

    pub fn done(&self, item: &T, succeeded: bool) {
        let mut state = self.state.lock().expect("not poisoned");
        state.processing.remove(item);
        if succeeded {
            state.failures.remove(item);
        }
        if state.dirty.remove(item) && state.queued.insert(item.clone()) {
            state.queue.push_back(item.clone());
            drop(state);
            self.ready.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.state.lock().expect("not poisoned").queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The delay after `failures` failures in a row: `base` doubled with each one after the
/// first, at most 30 s.
pub fn backoff(failures: u32, base: Duration) -> Duration {
    const CAP: Duration = Duration::from_secs(30);
    let doublings = failures.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(CAP)
}

/// What a reconcile asks for next.
pub enum Next {
    Done,
    /// Look again after this long (e.g. when a duration must pass).
    After(Duration),
}

/// Runs `workers` tasks taking keys from `queue` and reconciling them once every informer has
/// its first list (kube's WaitForCacheSync: a set reconciled before its pods are cached would
/// make them all again); failures are logged and retried with backoff.
pub fn run_workers<T, F, Fut, E>(
    name: &'static str,
    queue: Arc<Queue<T>>,
    workers: usize,
    informers: Arc<crate::informer::Informers>,
    reconcile: F,
) where
    T: Hash + Eq + Clone + Send + Sync + Display + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Next, E>> + Send,
    E: Display,
{
    let reconcile = Arc::new(reconcile);
    for _ in 0..workers {
        let queue = queue.clone();
        let (reconcile, informers) = (reconcile.clone(), informers.clone());
        tokio::spawn(async move {
            informers.synced().await;
            loop {
                let key = queue.next().await;
                match reconcile(key.clone()).await {
                    Ok(next) => {
                        queue.done(&key, true);
                        if let Next::After(delay) = next {
                            queue.add_after(key, delay);
                        }
                    }
                    Err(e) => {
                        tracing::info!(controller = %name, %key, error = %e, "reconcile failed");
                        queue.done(&key, false);
                        queue.retry(key);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let base = Duration::from_millis(200);
        let delays: Vec<Duration> = (1..=4).map(|n| backoff(n, base)).collect();
        assert_eq!(delays, [200, 400, 800, 1600].map(Duration::from_millis));
        assert_eq!(backoff(40, base), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn keys_are_deduplicated_and_never_processed_twice_at_once() {
        let q = Queue::new();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        let first = q.next().await;
        assert_eq!(first, "a");
        q.add("a"); // changed while processing: not handed out again yet
        assert_eq!(q.next().await, "b");
        assert!(q.is_empty());
        q.done(&"a", true);
        assert_eq!(q.next().await, "a", "processed again after it was done");
    }
}
