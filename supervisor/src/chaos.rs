//! `--chaos SPEC`: kills data roles at chosen points of a migration, to
//! show that restart and recovery hold (docs/state-machine.md, "Restart and
//! recovery"). Each side kills only its own roles; the demo hands the same
//! spec to its destination.
//!
//! SPEC is a comma-separated list of `ROLE@PHASE[+DELAY]` (ROLE:
//! `ram-sender`, `page-server`, `fault-handler`; PHASE: `precopy`,
//! `switchover`, `postcopy`; DELAY: `200ms`, `1s`, `1.5s`, default 0), or
//! `random:N:SEED`: N such kills drawn from SEED (the same N and SEED draw
//! the same kills on both sides).

use std::time::{Duration, Instant};

/// A point of the migration where a kill can happen.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Precopy,
    /// From the source guest's stop until the destination guest runs.
    Switchover,
    /// The destination guest runs; pages come on demand and in the push.
    Postcopy,
}

impl Phase {
    fn parse(s: &str) -> Result<Phase, String> {
        match s {
            "precopy" => Ok(Phase::Precopy),
            "switchover" => Ok(Phase::Switchover),
            "postcopy" => Ok(Phase::Postcopy),
            other => Err(format!(
                "--chaos: unknown phase {other:?} (precopy, switchover or postcopy)"
            )),
        }
    }
}

/// The roles a chaos entry can kill.
pub const ROLES: [&str; 3] = ["ram-sender", "page-server", "fault-handler"];

/// One planned kill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kill {
    pub role: &'static str,
    pub phase: Phase,
    pub delay: Duration,
    pub fired: bool,
}

/// The kills of one migration, in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chaos {
    /// The SPEC as given (handed on to the demo's destination).
    pub spec: String,
    pub kills: Vec<Kill>,
    /// The phase the migration is in, and since when (see [`Chaos::tick`]).
    since: Option<(Option<Phase>, Instant)>,
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    let bad = || format!("--chaos: bad delay {s:?} (e.g. 200ms, 1s, 1.5s)");
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !(0.0..=3600.0).contains(&(v * scale)) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A small deterministic generator (xorshift64*): the same seed draws the
/// same kills on both sides.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

impl Chaos {
    /// Parses SPEC (see the module doc). Errors name the part that is wrong.
    pub fn parse(spec: &str) -> Result<Chaos, String> {
        if let Some(rest) = spec.strip_prefix("random:") {
            let (n, seed) = rest
                .split_once(':')
                .ok_or_else(|| format!("--chaos {spec:?}: expected random:N:SEED"))?;
            let n: usize = n
                .parse()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| format!("--chaos {spec:?}: N must be 1 to 1000"))?;
            let seed: u64 = seed
                .parse()
                .map_err(|_| format!("--chaos {spec:?}: SEED must be a number"))?;
            let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
            let phases = [Phase::Precopy, Phase::Switchover, Phase::Postcopy];
            let kills = (0..n)
                .map(|_| Kill {
                    role: ROLES[(next(&mut state) % 3) as usize],
                    phase: phases[(next(&mut state) % 3) as usize],
                    delay: Duration::from_millis(next(&mut state) % 300),
                    fired: false,
                })
                .collect();
            return Ok(Chaos {
                spec: spec.to_string(),
                kills,
                since: None,
            });
        }
        let mut kills = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (role, rest) = entry
                .split_once('@')
                .ok_or_else(|| format!("--chaos {entry:?}: expected ROLE@PHASE[+DELAY]"))?;
            let role = ROLES.iter().find(|r| **r == role).ok_or_else(|| {
                format!("--chaos {entry:?}: unknown role {role:?} (one of {ROLES:?})")
            })?;
            let (phase, delay) = match rest.split_once('+') {
                Some((p, d)) => (Phase::parse(p)?, parse_delay(d)?),
                None => (Phase::parse(rest)?, Duration::ZERO),
            };
            kills.push(Kill {
                role,
                phase,
                delay,
                fired: false,
            });
        }
        if kills.is_empty() {
            return Err("--chaos: no kills given".into());
        }
        Ok(Chaos {
            spec: spec.to_string(),
            kills,
            since: None,
        })
    }

    /// The roles among `mine` to kill now: the migration is in `phase`
    /// since `since`. Each kill fires once, the first due one per call
    /// (a resync follows each kill).
    pub fn due(
        &mut self,
        mine: &[&str],
        phase: Option<Phase>,
        since: Instant,
    ) -> Option<&'static str> {
        let phase = phase?;
        let k = self.kills.iter_mut().find(|k| {
            !k.fired && k.phase == phase && mine.contains(&k.role) && since.elapsed() >= k.delay
        })?;
        k.fired = true;
        Some(k.role)
    }

    /// Called on every state change and tick with the phase the migration
    /// is in now: the role among `mine` to kill now, if one is due, and the
    /// phase it dies in.
    pub fn tick(&mut self, mine: &[&str], phase: Option<Phase>) -> Option<(&'static str, Phase)> {
        let since = match self.since {
            Some((p, t)) if p == phase => t,
            _ => {
                let now = Instant::now();
                self.since = Some((phase, now));
                now
            }
        };
        let role = self.due(mine, phase, since)?;
        Some((role, phase.expect("a kill is due only in a phase")))
    }

    /// How many kills of `mine` fired, of how many planned.
    pub fn tally(&self, mine: &[&str]) -> (usize, usize) {
        let planned = self.kills.iter().filter(|k| mine.contains(&k.role));
        let fired = planned.clone().filter(|k| k.fired).count();
        (fired, planned.count())
    }
}

/// One `--chaos` step for a driver: if a kill of one of `mine` is due in
/// `phase`, notes it in `report` (event `chaos`) and kills the role (as a
/// crash would, SIGKILL).
pub fn fire(
    chaos: Option<&mut Chaos>,
    mine: &[&str],
    phase: Option<Phase>,
    s: &mut crate::session::Session,
    report: &mut crate::report::Report,
) {
    if let Some((role, phase)) = chaos.and_then(|c| c.tick(mine, phase)) {
        report.note(s.started, "chaos", format!("killing {role} in {phase:?}"));
        s.kill(role);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_refuses_bad_ones() {
        let c = Chaos::parse("fault-handler@postcopy+200ms,ram-sender@precopy").unwrap();
        assert_eq!(c.kills.len(), 2);
        assert_eq!(c.kills[0].role, "fault-handler");
        assert_eq!(c.kills[0].phase, Phase::Postcopy);
        assert_eq!(c.kills[0].delay, Duration::from_millis(200));
        assert_eq!(c.kills[1].delay, Duration::ZERO);
        for bad in [
            "",
            "guest@precopy",
            "ram-sender@later",
            "ram-sender",
            "ram-sender@precopy+soon",
            "random:0:1",
            "random:3",
        ] {
            assert!(Chaos::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn random_is_the_same_for_the_same_seed() {
        let a = Chaos::parse("random:20:7").unwrap();
        assert_eq!(a, Chaos::parse("random:20:7").unwrap());
        assert_ne!(a, Chaos::parse("random:20:8").unwrap());
        // Every role and phase can come up.
        for r in ROLES {
            assert!(a.kills.iter().any(|k| k.role == r), "{r} never drawn");
        }
    }

    #[test]
    fn each_kill_fires_once_after_its_delay() {
        let mut c = Chaos::parse("ram-sender@precopy+50ms,fault-handler@precopy").unwrap();
        let t = Instant::now();
        assert_eq!(c.due(&["ram-sender"], Some(Phase::Precopy), t), None);
        assert_eq!(c.due(&["ram-sender"], Some(Phase::Postcopy), t), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            c.due(&["ram-sender"], Some(Phase::Precopy), t),
            Some("ram-sender")
        );
        assert_eq!(c.due(&["ram-sender"], Some(Phase::Precopy), t), None);
        assert_eq!(c.tally(&["ram-sender"]), (1, 1));
        assert_eq!(c.tally(&["fault-handler"]), (0, 1));
    }
}
