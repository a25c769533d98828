//! A Bernoulli world played against a `Bandit` entirely in Rust, for simulations with
//! long horizons (a million rounds in well under a second) through the same `choose` and
//! `apply_rewards` the server calls.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::bandit::Bandit;
use crate::error::CoreError;
use crate::kernel::KernelRng;

/// Hidden conversion rates from round `start` on (phases sorted by start, the first at 0).
pub struct Phase {
    pub start: usize,
    pub rates: Vec<f64>,
}

/// What happened: the arm chosen and the reward seen at each round, and every arm's
/// posterior mean at each checkpoint (row-major, one row per checkpoint).
pub struct Outcome {
    pub arms: Vec<u32>,
    pub rewards: Vec<u8>,
    pub means: Vec<f64>,
}

/// Plays `horizon` rounds. Rewards are applied in batches of `update_every` decisions (the
/// delay between a decision and the posterior update). The reward stream is drawn from
/// `world_seed` alone (one uniform per round), so policies run on the same seed face the
/// same luck: comparisons between them have less noise.
pub fn run(
    bandit: &mut Bandit,
    rng: &mut KernelRng,
    phases: &[Phase],
    horizon: usize,
    update_every: usize,
    checkpoints: &[usize],
    world_seed: u64,
) -> Result<Outcome, CoreError> {
    check(bandit, phases, update_every, checkpoints)?;
    let n_arms = bandit.len();
    let mut world = Xoshiro256PlusPlus::seed_from_u64(world_seed);
    let mut out = Outcome {
        arms: Vec::with_capacity(horizon),
        rewards: Vec::with_capacity(horizon),
        means: Vec::with_capacity(checkpoints.len() * n_arms),
    };
    let (mut pending_arms, mut pending_values) = (Vec::new(), Vec::new());
    let (mut phase, mut next_checkpoint) = (0usize, 0usize);
    for round in 0..horizon {
        while phase + 1 < phases.len() && phases[phase + 1].start <= round {
            phase += 1;
        }
        while next_checkpoint < checkpoints.len() && checkpoints[next_checkpoint] <= round {
            out.means.extend((0..n_arms).map(|a| bandit.mean(a)));
            next_checkpoint += 1;
        }
        let arm = bandit.choose(rng, 1)?[0].arm;
        let reward = world.random::<f64>() < phases[phase].rates[arm];
        out.arms.push(arm as u32);
        out.rewards.push(reward as u8);
        pending_arms.push(arm);
        pending_values.push(if reward { 1.0 } else { 0.0 });
        if pending_arms.len() >= update_every {
            bandit.apply_rewards(&pending_arms, &pending_values)?;
            bandit.maintain();
            pending_arms.clear();
            pending_values.clear();
        }
    }
    for _ in next_checkpoint..checkpoints.len() {
        out.means.extend((0..n_arms).map(|a| bandit.mean(a)));
    }
    Ok(out)
}

fn check(
    bandit: &Bandit,
    phases: &[Phase],
    update_every: usize,
    checkpoints: &[usize],
) -> Result<(), CoreError> {
    if bandit.n_active() == 0 {
        return Err(CoreError::invalid(
            "the bandit has no active arms to simulate",
        ));
    }
    if update_every == 0 {
        return Err(CoreError::invalid("update_every must be at least 1"));
    }
    if phases.first().map(|p| p.start) != Some(0) {
        return Err(CoreError::invalid("the first phase must start at round 0"));
    }
    if phases.windows(2).any(|w| w[1].start <= w[0].start) {
        return Err(CoreError::invalid("phase starts must increase"));
    }
    if checkpoints.windows(2).any(|w| w[1] < w[0]) {
        return Err(CoreError::invalid("checkpoints must not decrease"));
    }
    for p in phases {
        if p.rates.len() != bandit.len() {
            return Err(CoreError::invalid(format!(
                "a phase has {} rates for {} arms",
                p.rates.len(),
                bandit.len()
            )));
        }
        if let Some(r) = p.rates.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            return Err(CoreError::invalid(format!(
                "conversion rates must lie in [0, 1], got {r}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, RewardModel};

    fn thompson(n: usize) -> Bandit {
        let policy = Policy::parse("thompson", 0.0, 0.0, 0.0, 0.0, 0.0).unwrap();
        let mut b = Bandit::new(RewardModel::Bernoulli, policy, 0.0).unwrap();
        b.add_arms(&vec![1.0; n], &vec![1.0; n]).unwrap();
        b
    }

    #[test]
    fn thompson_finds_the_best_arm() {
        let mut b = thompson(3);
        let mut rng = KernelRng::seed_from_u64(1);
        let phases = [Phase {
            start: 0,
            rates: vec![0.1, 0.5, 0.2],
        }];
        let out = run(&mut b, &mut rng, &phases, 5_000, 1, &[0, 4_999], 7).unwrap();
        let late_best = out.arms[4_000..].iter().filter(|&&a| a == 1).count();
        assert!(late_best > 900, "best arm got {late_best} of the last 1000");
        assert_eq!(out.means.len(), 6);
        assert!((out.means[4] - 0.5).abs() < 0.05);
    }

    #[test]
    fn same_world_seed_gives_the_same_luck() {
        let phases = [Phase {
            start: 0,
            rates: vec![0.3, 0.3],
        }];
        let a = run(
            &mut thompson(2),
            &mut KernelRng::seed_from_u64(1),
            &phases,
            500,
            10,
            &[],
            3,
        )
        .unwrap();
        let b = run(
            &mut thompson(2),
            &mut KernelRng::seed_from_u64(2),
            &phases,
            500,
            10,
            &[],
            3,
        )
        .unwrap();
        assert_eq!(
            a.rewards, b.rewards,
            "equal rates and world seed give the same rewards"
        );
    }

    #[test]
    fn bad_worlds_are_refused() {
        let mut rng = KernelRng::seed_from_u64(1);
        let bad_rates = [Phase {
            start: 0,
            rates: vec![0.3, 1.5],
        }];
        assert!(run(&mut thompson(2), &mut rng, &bad_rates, 10, 1, &[], 1).is_err());
        let short = [Phase {
            start: 0,
            rates: vec![0.3],
        }];
        assert!(run(&mut thompson(2), &mut rng, &short, 10, 1, &[], 1).is_err());
        let ok = [Phase {
            start: 0,
            rates: vec![0.3, 0.4],
        }];
        assert!(run(&mut thompson(2), &mut rng, &ok, 10, 0, &[], 1).is_err());
    }
}
