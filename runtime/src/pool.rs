//! The thread pool of the fast kernels: workers that spin between the ops of an inference.
//!
//! A model runs many short parallel ops back to back (a GEMM of BERT-base takes half a
//! millisecond); waking a sleeping thread for each costs a noticeable share of that. Workers
//! here spin while work keeps coming and only sleep after [`SPIN`] without any. One job runs at
//! a time: a caller that finds the pool busy (another thread running a model) runs its items
//! itself.
//!
//! The pool size is set once per process ([`set_threads`], `tcc --threads`); by default it is
//! the number of cores.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(5);

/// One parallel loop: `f(i)` for `i` in `0..total`, claimed item by item, or in fixed
/// per-thread shares ([`Pool::run_static`]).
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    next: AtomicUsize,
    done: AtomicUsize,
    total: usize,
    /// Non-zero: thread `t` (the caller is 0) runs items `t * total / shares .. (t + 1) *
    /// total / shares`, once (`taken` has bit `t` set once it has).
    shares: usize,
    taken: AtomicUsize,
}

impl Job<'_> {
    /// Runs this thread's share, or claims and runs items until none are left.
    fn work(&self, thread: usize) {
        if self.shares > 0 {
            let bit = 1usize << thread;
            if thread >= self.shares || self.taken.fetch_or(bit, SeqCst) & bit != 0 {
                return;
            }
            for i in thread * self.total / self.shares..(thread + 1) * self.total / self.shares {
                (self.f)(i);
                self.done.fetch_add(1, SeqCst);
            }
            return;
        }
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.total {
                return;
            }
            (self.f)(i);
            self.done.fetch_add(1, SeqCst);
        }
    }
}

struct Shared {
    /// The current job (a `Job` on the caller's stack), or null.
    job: AtomicPtr<Job<'static>>,
    /// Workers that may be reading `job`.
    inside: AtomicUsize,
    sleepers: Mutex<usize>,
    wake: Condvar,
    shutdown: AtomicBool,
}

pub struct Pool {
    shared: Arc<Shared>,
    busy: Mutex<()>,
    threads: usize,
}

impl Pool {
    /// A pool of `threads` threads in all (the caller counts as one).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            inside: AtomicUsize::new(0),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        for i in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("tcc-worker-{i}"))
                .spawn(move || worker(&s, i))
                .expect("spawn a worker thread");
        }
        Pool { shared, busy: Mutex::new(()), threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every `i` in `0..n`, in parallel; returns when all are done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.run_job(n, f, false)
    }

    /// As [`Pool::run`], but thread `t` of `T` always runs items `t * n / T .. (t + 1) * n / T`:
    /// ops split the same way (the column blocks of the Q, K and V products, then the heads
    /// of attention) find their inputs in the cache of the core that wrote them. No thread
    /// takes over another's share, so use it for items of equal cost.
    pub fn run_static(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.run_job(n, f, self.threads <= usize::BITS as usize)
    }

    fn run_job(&self, n: usize, f: &(dyn Fn(usize) + Sync), fixed: bool) {
        if n == 0 {
            return;
        }
        let Ok(_guard) = self.busy.try_lock() else {
            (0..n).for_each(f);
            return;
        };
        if n == 1 || self.threads == 1 {
            (0..n).for_each(f);
            return;
        }
        let shares = if fixed { self.threads } else { 0 };
        let job = Job {
            f,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            total: n,
            shares,
            taken: AtomicUsize::new(0),
        };
        // SAFETY: the pointer is published only while `job` is alive: this function clears it
        // and then waits until no worker is inside (see `worker`) before `job` goes out of
        // scope, so no worker can dereference it afterwards. The 'static in the type is never
        // relied on beyond that window.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        self.shared.job.store(ptr, SeqCst);
        {
            let sleepers = self.shared.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            if *sleepers > 0 {
                self.shared.wake.notify_all();
            }
        }
        job.work(0);
        while job.done.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        self.shared.job.store(std::ptr::null_mut(), SeqCst);
        while self.shared.inside.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        let _l = self.shared.sleepers.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.wake.notify_all();
    }
}

fn worker(s: &Shared, index: usize) {
    let mut idle_since = Instant::now();
    while !s.shutdown.load(SeqCst) {
        s.inside.fetch_add(1, SeqCst);
        let p = s.job.load(SeqCst);
        if !p.is_null() {
            // SAFETY: `p` was read after announcing ourselves in `inside`, so the caller of
            // `run` that published it has not returned (it waits for `inside == 0` after
            // clearing the pointer).
            unsafe { (*p).work(index) };
            s.inside.fetch_sub(1, SeqCst);
            idle_since = Instant::now();
            continue;
        }
        s.inside.fetch_sub(1, SeqCst);
        if idle_since.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
        *sleepers += 1;
        while s.job.load(SeqCst).is_null() && !s.shutdown.load(SeqCst) {
            sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
        }
        *sleepers -= 1;
        idle_since = Instant::now();
    }
}

static THREADS: OnceLock<usize> = OnceLock::new();
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the number of threads of the process-wide pool; returns false if it is already set.
pub fn set_threads(n: usize) -> bool {
    THREADS.set(n.max(1)).is_ok() && POOL.get().is_none()
}

/// The process-wide pool.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = *THREADS.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        Pool::new(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_even_under_contention() {
        let pool = Arc::new(Pool::new(3));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for round in 0..200 {
                        let n = 1 + (round * 7 + t) % 50;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        let f = |i: usize| {
                            hits[i].fetch_add(1, SeqCst);
                        };
                        if round % 2 == 0 {
                            pool.run(n, &f)
                        } else {
                            pool.run_static(n, &f)
                        }
                        assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn static_shares_stay_on_their_thread() {
        let pool = Pool::new(3);
        let caller = std::thread::current().id();
        for n in [2usize, 3, 7, 12, 50] {
            let ran_on: Vec<Mutex<Option<std::thread::ThreadId>>> = (0..n).map(|_| Mutex::new(None)).collect();
            pool.run_static(n, &|i| {
                *ran_on[i].lock().unwrap() = Some(std::thread::current().id());
            });
            let ids: Vec<_> = ran_on.iter().map(|m| m.lock().unwrap().expect("every item ran")).collect();
            for t in 0..3 {
                let share = &ids[t * n / 3..(t + 1) * n / 3];
                assert!(share.windows(2).all(|w| w[0] == w[1]), "n={n}: share {t} ran on several threads");
                if t == 0 {
                    assert!(share.iter().all(|&id| id == caller), "n={n}: the caller runs share 0");
                } else {
                    assert!(share.iter().all(|&id| id != caller), "n={n}: share {t} ran on the caller");
                }
            }
        }
        // A sleeping worker is woken for its share.
        std::thread::sleep(SPIN * 3);
        let count = AtomicUsize::new(0);
        pool.run_static(30, &|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 30);
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 3);
        let count = AtomicUsize::new(0);
        pool.run(100, &|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 100);
    }
}
