//! The threads that run the kernels' parallel loops.
//!
//! A decode step is about a hundred parallel loops (one per projection,
//! attention, the routed experts of each layer), most of them 20-100 µs of
//! work. Entering a rayon pool from outside costs a wake-up of its sleeping
//! workers and of the blocked caller: measured on a 2-vCPU KVM guest, a loop
//! of eight 2 µs tasks took 23 µs from outside the pool against 10 µs from
//! inside, 55 µs when the workers had idled 50 µs before it. So, as
//! llama.cpp's threads do between operations, these workers spin for a
//! while after each loop and the caller runs tasks itself instead of
//! sleeping; they park only after [`SPIN`] without work (a chat waiting for
//! its user). A forward pass that waits for expert reads holds
//! [`stay_awake`] instead: its wait ends in a loop, and on a 16-vCPU guest
//! waking 15 parked workers after each layer's reads cost 30-40 ms a token
//! at a quarter of the experts cached (decode 9.6 against 13.6 tok/s with
//! the workers spinning through the waits).
//!
//! Tasks are handed out one index at a time from a shared counter, which
//! balances uneven tasks (experts of a prefill chunk) as work stealing
//! would. A loop inside a task runs on that task's thread: the task is
//! already one of many, and its thread-local scratch stays its own.
//! Callers on several threads at once (tests, a server's sessions) do not
//! queue: a second caller runs its loop on its own thread.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next loop before it parks. Long
/// enough to span a decode step's serial parts and the gap between tokens,
/// short enough that an idle engine goes quiet at once to a human.
const SPIN: Duration = Duration::from_millis(5);

/// Holders of [`stay_awake`]: while any, idle workers spin past [`SPIN`].
static AWAKE: AtomicUsize = AtomicUsize::new(0);

/// Keeps idle workers spinning, not parked, until the guard drops: for a
/// wait that is short, is not for a user, and ends in parallel loops (a
/// layer blocked on its experts' reads). Costs the idle workers' cores for
/// that long, which the reads do not need: they are DMA and a few syscalls.
pub(crate) fn stay_awake() -> Awake {
    AWAKE.fetch_add(1, Ordering::Relaxed);
    Awake(())
}

/// The guard of [`stay_awake`].
pub(crate) struct Awake(());

impl Drop for Awake {
    fn drop(&mut self) {
        AWAKE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Threads requested before the pool starts; 0 picks the default.
static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

thread_local! {
    /// Whether this thread is running a task of a loop (always, on workers).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// [`beside`]'s side job, until this thread's next loop hands its tasks
    /// to the workers. Its lifetime is erased: `beside` takes it back
    /// before returning.
    static SIDE: Cell<Option<*mut (dyn FnMut() + 'static)>> = const { Cell::new(None) };
}

/// Runs `main` on this thread and `side` on this thread too, as soon as
/// the first parallel loop of `main` has handed its tasks to the workers
/// (before this thread joins them), or after `main` when it runs no loop
/// on the pool. For work that must stay on the calling thread and is
/// short beside the loops: the CUDA decoder queues the GPU's share of a
/// split layer this way, which held the CPU's share back 35 µs a layer
/// when queued before it.
///
/// # Panics
/// With `side`'s panic, after the loop it ran in has finished.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn beside<R>(side: impl FnOnce(), main: impl FnOnce() -> R) -> R {
    let mut side = Some(side);
    let mut call = || {
        if let Some(side) = side.take() {
            side()
        }
    };
    let erased: *mut (dyn FnMut() + '_) = &mut call;
    // SAFETY: the pointer is taken back from `SIDE` below, before `call`
    // goes out of scope, whether or not a loop ran it (and if `main`
    // panics, the guard clears it while unwinding).
    let erased: *mut (dyn FnMut() + 'static) = unsafe { std::mem::transmute(erased) };
    let outer = SIDE.replace(Some(erased));
    struct Restore(Option<*mut (dyn FnMut() + 'static)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SIDE.set(self.0);
        }
    }
    let restore = Restore(outer);
    let r = main();
    drop(restore);
    call();
    r
}

/// Runs the side job [`beside`] left for this thread, if any, catching its
/// panic for the caller to resume once the workers are done.
fn run_side() -> Option<Box<dyn Any + Send>> {
    let side = SIDE.take()?;
    // SAFETY: `beside` keeps the closure alive until it has taken the
    // pointer back, and only this thread sees it.
    catch_unwind(AssertUnwindSafe(|| unsafe { (*side)() })).err()
}

/// Sets how many threads run the kernels, the caller counting as one (so
/// `n - 1` workers). Takes effect only before the first parallel loop;
/// returns the count in force, which differs from `n` if it came too late.
pub fn set_threads(n: usize) -> usize {
    REQUESTED.store(n.max(1), Ordering::Relaxed);
    threads()
}

/// Threads that run a parallel loop, the caller included.
pub fn threads() -> usize {
    pool().workers + 1
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = match REQUESTED.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Pool::start(n - 1)
    })
}

/// Runs `f(i)` for every `i` in `0..n`, on the pool's threads and the
/// caller's; in order on the calling thread when that is a task of an
/// enclosing loop, or when `n` is 1.
///
/// # Panics
/// If a task panics, after every other task has finished or been skipped,
/// with the first task's panic payload.
pub(crate) fn for_each_task(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 || IN_TASK.get() {
        return (0..n).for_each(f);
    }
    let pool = pool();
    // A task's panic unwinds through a holder of the lock and poisons it;
    // the pool itself is left consistent (`Pool::run`), so that is no reason
    // to stop using it.
    let only_caller = match pool.submit.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    match only_caller {
        Some(_guard) if pool.workers > 0 => pool.run(n, &f),
        _ => (0..n).for_each(f),
    }
}

struct Pool {
    workers: usize,
    shared: &'static Shared,
    /// Held by the one caller whose loop the workers run.
    submit: Mutex<()>,
}

/// The loop being run. The closure's lifetime is erased: the caller that
/// publishes it does not return before every worker has left it.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

struct Shared {
    /// Bumped once per loop; workers compare it with the last one they ran.
    epoch: AtomicUsize,
    job: UnsafeCell<Job>,
    /// The next task index to hand out.
    next: AtomicUsize,
    /// Workers that have not yet finished the current loop.
    pending: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Parked workers wait on this; the count tells a caller to notify.
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding `Pool::submit` while
// no worker reads it (all have finished the previous loop: `pending` is 0),
// and read by workers only between the epoch bump that publishes it
// (release/acquire) and their `pending` decrement.
unsafe impl Sync for Shared {}

fn noop(_: usize) {}

impl Pool {
    fn start(workers: usize) -> Pool {
        let empty: &'static (dyn Fn(usize) + Sync) = &noop;
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(Job { f: empty, n: 0 }),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panic: Mutex::new(None),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        }));
        let mut started = 0;
        for i in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("smoe-kernel-{i}"))
                .spawn(move || worker(shared));
            // Without a thread the pool is smaller, not broken.
            if spawned.is_ok() {
                started += 1;
            }
        }
        Pool {
            workers: started,
            shared,
            submit: Mutex::new(()),
        }
    }

    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = self.shared;
        // SAFETY: see `Shared`; `f` outlives this call, which waits below
        // for every worker to be done with it, even if a task panics.
        unsafe {
            *s.job.get() = Job {
                f: std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(
                    f,
                ),
                n,
            }
        };
        s.next.store(0, Ordering::Relaxed);
        s.pending.store(self.workers, Ordering::Relaxed);
        // SeqCst pairs with the parking worker's: either it sees the new
        // epoch before it waits, or this sees it parked and wakes it.
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if *s.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        let side = run_side();
        IN_TASK.set(true);
        run_tasks(s, f, n);
        IN_TASK.set(false);
        wait_until(|| s.pending.load(Ordering::Acquire) == 0);
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic.or(side) {
            resume_unwind(payload);
        }
    }
}

/// Takes task indices until none are left. A panicking task ends the loop
/// early: the rest are skipped and its payload is kept for the caller.
fn run_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync), n: usize) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            s.next.store(n, Ordering::Relaxed);
            s.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(payload);
            return;
        }
    }
}

fn worker(s: &'static Shared) {
    IN_TASK.set(true);
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut polls = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(1024)
                || start.elapsed() < SPIN
                || AWAKE.load(Ordering::Relaxed) > 0
            {
                std::hint::spin_loop();
                continue;
            }
            let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
            *parked += 1;
            while s.epoch.load(Ordering::SeqCst) == seen {
                parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
            }
            *parked -= 1;
        };
        seen = epoch;
        // SAFETY: see `Shared`: the job of `epoch` stays valid until this
        // worker decrements `pending`.
        let job = unsafe { *s.job.get() };
        run_tasks(s, unsafe { &*job.f }, job.n);
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Spins, then yields, until `done` holds: the caller's wait for workers
/// finishing their last task, microseconds as a rule.
fn wait_until(done: impl Fn() -> bool) {
    let mut polls = 0u32;
    while !done() {
        polls = polls.wrapping_add(1);
        if polls < 1 << 16 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once() {
        for n in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            for_each_task(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn a_side_job_runs_once_on_the_caller() {
        let me = std::thread::current().id();
        for n in [0, 1, 64] {
            let (mut runs, tasks) = (0, AtomicU64::new(0));
            let r = beside(
                || {
                    assert_eq!(std::thread::current().id(), me);
                    runs += 1;
                },
                || {
                    for_each_task(n, |_| {
                        tasks.fetch_add(1, Ordering::Relaxed);
                    });
                    for_each_task(n, |_| {
                        tasks.fetch_add(1, Ordering::Relaxed);
                    });
                    7
                },
            );
            assert_eq!((r, runs), (7, 1), "n={n}");
            assert_eq!(tasks.load(Ordering::Relaxed), 2 * n as u64);
        }
        // Nothing is left behind for a later loop.
        for_each_task(64, |_| {});
    }

    #[test]
    fn a_side_job_panic_reaches_the_caller_after_the_loop() {
        let tasks = AtomicU64::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            beside(
                || panic!("side"),
                || {
                    for_each_task(64, |_| {
                        tasks.fetch_add(1, Ordering::Relaxed);
                    })
                },
            )
        }));
        assert_eq!(r.expect_err("panics").downcast_ref::<&str>(), Some(&"side"));
        assert_eq!(tasks.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn nested_loops_run_on_the_task_thread() {
        let total = AtomicU64::new(0);
        for_each_task(8, |_| {
            let me = std::thread::current().id();
            for_each_task(4, |_| {
                assert_eq!(std::thread::current().id(), me);
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 32);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_survives() {
        let r = catch_unwind(|| {
            for_each_task(64, |i| {
                if i == 7 {
                    panic!("task seven");
                }
            })
        });
        let payload = r.expect_err("the panic propagates");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"task seven"));
        let sum = AtomicU64::new(0);
        for_each_task(100, |i| {
            sum.fetch_add(i as u64, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
        if threads() > 1 {
            // Still spread over threads, though tests running beside this
            // one may hold the pool for a while: a loop then runs on its
            // caller alone.
            let spread = (0..200).any(|_| {
                let ids = Mutex::new(std::collections::HashSet::new());
                for_each_task(8, |_| {
                    std::thread::sleep(Duration::from_millis(1));
                    ids.lock().unwrap().insert(std::thread::current().id());
                });
                let n = ids.lock().unwrap().len();
                n > 1
            });
            assert!(spread, "after a panic, loops run on one thread only");
        }
    }

    #[test]
    fn concurrent_callers_all_complete() {
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                scope.spawn(move || {
                    for _ in 0..200 {
                        let sum = AtomicU64::new(0);
                        for_each_task(33, |i| {
                            sum.fetch_add(i as u64 + t, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 528 + 33 * t);
                    }
                });
            }
        });
    }

    #[test]
    fn workers_stay_awake_while_a_guard_is_held() {
        if threads() < 2 {
            return;
        }
        let parked = || *pool().shared.parked.lock().unwrap();
        let _awake = stay_awake();
        // A loop that reaches the workers wakes any parked ones; tests
        // beside this one may hold the pool, so try a few.
        let woken = (0..200).any(|_| {
            for_each_task(64, |_| std::thread::sleep(Duration::from_micros(50)));
            parked() == 0
        });
        assert!(woken, "no loop reached the workers");
        std::thread::sleep(4 * SPIN);
        assert_eq!(parked(), 0, "workers parked while a guard was held");
    }
}
