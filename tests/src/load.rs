//! Host CPU load on demand: spinning threads in the test process, `set(k)` keeps k of them
//! busy (in 20 ms slices, so a change takes effect within one slice).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spinning threads; stopped and joined on drop.
#[derive(Debug)]
pub struct Spinners {
    want: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    /// `n` threads, all idle.
    pub fn start(n: usize) -> Spinners {
        let want = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let (want, stop) = (want.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if i < want.load(Ordering::Relaxed) {
                            let until = Instant::now() + Duration::from_millis(20);
                            while Instant::now() < until {
                                std::hint::spin_loop();
                            }
                        } else {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
            })
            .collect();
        Spinners {
            want,
            stop,
            threads,
        }
    }

    /// Keeps `k` of the threads busy from now on.
    pub fn set(&self, k: usize) {
        self.want.store(k, Ordering::Relaxed);
    }

    /// Cycles through `levels`, `each` per level, for `total`.
    pub fn drive(&self, levels: &[usize], each: Duration, total: Duration) {
        let end = Instant::now() + total;
        for k in levels.iter().cycle() {
            if Instant::now() >= end {
                break;
            }
            self.set(*k);
            std::thread::sleep(each.min(end.saturating_duration_since(Instant::now())));
        }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
