//! CPU used over a measured window: how busy the whole machine was, and how much CPU time the
//! load generator (this process) and the server under test (`--server-pid`) took. A latency
//! figure means little without it: on two shared cores, a server at 50% of its maximum rate can
//! leave the machine 90% busy, because a fixed-rate run batches less than a run at full speed
//! and so costs more per message (docs/BENCHMARKS.md, session 16).

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Started at the beginning of a window, stopped at its end.
pub struct CpuMeter {
    system: System,
    own: Option<Pid>,
    server: Option<Pid>,
    /// CPU milliseconds of (this process, the server) at the start.
    at_start: (Option<u64>, Option<u64>),
}

/// What a window used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuUse {
    /// Share of all cores that was busy, 0 to 100 (every process on the machine).
    pub machine_busy_pct: f64,
    /// CPU milliseconds this process (the load generator) used.
    pub load_generator_ms: Option<u64>,
    /// CPU milliseconds the server process used (all its threads).
    pub server_ms: Option<u64>,
}

impl CpuMeter {
    /// `None` where the platform gives no CPU figures.
    pub fn start(server_pid: Option<u32>) -> Option<Self> {
        let mut system = System::new().ok()?;
        system.refresh_cpu_usage();
        let mut meter = Self {
            system,
            own: sysinfo::get_current_pid().ok(),
            server: server_pid.map(Pid::from_u32),
            at_start: (None, None),
        };
        meter.at_start = meter.process_ms();
        Some(meter)
    }

    /// CPU milliseconds so far of this process and of the server.
    fn process_ms(&mut self) -> (Option<u64>, Option<u64>) {
        let pids: Vec<Pid> = [self.own, self.server].into_iter().flatten().collect();
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&pids),
            true,
            ProcessRefreshKind::nothing().with_cpu(),
        );
        let ms = |pid: Option<Pid>| {
            pid.and_then(|p| self.system.process(p))
                .map(|p| p.accumulated_cpu_time())
        };
        (ms(self.own), ms(self.server))
    }

    pub fn stop(mut self) -> CpuUse {
        self.system.refresh_cpu_usage();
        let machine_busy_pct = f64::from(self.system.global_cpu_usage());
        let (own, server) = self.process_ms();
        let used = |start: Option<u64>, end: Option<u64>| Some(end?.saturating_sub(start?));
        CpuUse {
            machine_busy_pct,
            load_generator_ms: used(self.at_start.0, own),
            server_ms: used(self.at_start.1, server),
        }
    }
}

impl CpuUse {
    /// Microseconds of CPU per message, for `messages` handled in the window; `None` without a
    /// figure or a message.
    pub fn per_message_us(ms: Option<u64>, messages: u64) -> Option<f64> {
        (messages > 0).then_some(())?;
        Some(ms? as f64 * 1000.0 / messages as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meter_counts_the_cpu_this_process_burns() {
        let meter = CpuMeter::start(Some(std::process::id())).expect("Linux has CPU figures");
        // 300 ms of work on this thread; other tests may share the cores meanwhile, so the
        // thread gets at least some of it and the process at most every core for that long.
        let began = std::time::Instant::now();
        let mut x = 0u64;
        while began.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let used = meter.stop();
        let wall_ms = began.elapsed().as_millis() as u64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let own = used.load_generator_ms.expect("own CPU time");
        assert!(
            (10..=wall_ms * cores + 30).contains(&own),
            "counted {own} ms for {wall_ms} ms of work on {cores} cores"
        );
        // The "server" is this process too: the same figure, within a tick of the refresh.
        let server = used.server_ms.expect("the server's CPU time");
        assert!(
            server.abs_diff(own) <= 20,
            "own {own} ms, server {server} ms"
        );
        assert!(
            used.machine_busy_pct > 0.0 && used.machine_busy_pct <= 100.0,
            "busy {}%",
            used.machine_busy_pct
        );
    }

    #[test]
    fn a_missing_server_has_no_figure_and_nothing_per_message_is_none() {
        // Pid 0 is never a user process.
        let used = CpuMeter::start(Some(0))
            .expect("Linux has CPU figures")
            .stop();
        assert_eq!(used.server_ms, None);
        assert_eq!(CpuUse::per_message_us(Some(5), 0), None);
        assert_eq!(CpuUse::per_message_us(None, 10), None);
        assert_eq!(CpuUse::per_message_us(Some(5), 1000), Some(5.0));
    }
}
