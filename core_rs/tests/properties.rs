//! Guarantees of the decision core, as property tests over random states and rewards.

use _core::bandit::Bandit;
use _core::kernel::KernelRng;
use _core::policy::{Policy, RewardModel};
use proptest::prelude::*;

fn policies() -> Vec<Policy> {
    vec![
        Policy::Thompson { exploitation: 1.0 },
        Policy::Thompson { exploitation: 4.0 },
        Policy::Ucb1 { c: 1.0 },
        Policy::KlUcb { c: 0.0 },
        Policy::EpsilonGreedy {
            epsilon: 0.1,
            decay: 100.0,
        },
        Policy::Softmax { temperature: 0.05 },
        Policy::Greedy,
        Policy::Uniform,
    ]
}

fn bernoulli(policy: Policy, priors: &[(f64, f64)]) -> Bandit {
    let mut b = Bandit::new(RewardModel::Bernoulli, policy, 0.0).unwrap();
    let (a, bb): (Vec<f64>, Vec<f64>) = priors.iter().copied().unzip();
    b.add_arms(&a, &bb).unwrap();
    b
}

fn prior() -> impl Strategy<Value = (f64, f64)> {
    (1e-3f64..1e4, 1e-3f64..1e4)
}

fn rewards(arms: usize) -> impl Strategy<Value = Vec<(usize, f64)>> {
    prop::collection::vec(
        (0..arms, prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0]),
        0..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Posterior means and the scores of chosen arms are finite probabilities, for every
    /// policy and any priors and rewards; Thompson draws too.
    #[test]
    fn scores_are_probabilities(
        priors in prop::collection::vec(prior(), 2..40),
        seed in any::<u64>(),
        k in 1usize..3,
    ) {
        let n = priors.len();
        let mut rng = KernelRng::seed_from_u64(seed);
        for policy in policies() {
            let mut b = bernoulli(policy, &priors);
            let arms: Vec<usize> = (0..200).map(|i| (i * 7 + seed as usize) % n).collect();
            let values: Vec<f64> = (0..200).map(|i| ((i as u64 ^ seed) % 3) as f64 / 2.0).collect();
            b.apply_rewards(&arms, &values).unwrap();
            for arm in 0..n {
                let m = b.mean(arm);
                prop_assert!(m.is_finite() && (0.0..=1.0).contains(&m), "{policy:?} mean {m}");
            }
            for _ in 0..20 {
                let chosen = b.choose(&mut rng, k.min(n)).unwrap();
                prop_assert_eq!(chosen.len(), k.min(n));
                if let Policy::Thompson { .. } = policy {
                    for c in &chosen {
                        prop_assert!((0.0..=1.0).contains(&c.value), "draw {}", c.value);
                    }
                }
            }
            let p = b.inclusion_probabilities(&mut rng, 1, 200).unwrap();
            prop_assert!(p.iter().all(|x| x.is_finite() && (0.0..=1.0 + 1e-9).contains(x)));
        }
    }

    /// A reward of 1 never lowers the rewarded arm's posterior mean and a 0 never raises it,
    /// with own priors and with group-level (pooled) priors.
    #[test]
    fn rewards_move_the_mean_the_right_way(
        priors in prop::collection::vec(prior(), 2..30),
        history in rewards(30),
        arm_pick in any::<prop::sample::Index>(),
        grouped in any::<bool>(),
        strength in 0.5f64..500.0,
    ) {
        let n = priors.len();
        let mut b = bernoulli(Policy::Thompson { exploitation: 1.0 }, &priors);
        if grouped {
            let groups: Vec<i64> = (0..n as i64).map(|i| i % 3 - 1).collect();
            b.set_groups(&groups, strength).unwrap();
        }
        let (arms, values): (Vec<usize>, Vec<f64>) =
            history.into_iter().map(|(a, v)| (a % n, v)).unzip();
        b.apply_rewards(&arms, &values).unwrap();
        let arm = arm_pick.index(n);
        let before = b.mean(arm);
        let mut up = b.clone();
        up.apply_rewards(&[arm], &[1.0]).unwrap();
        prop_assert!(up.mean(arm) >= before - 1e-12, "1 lowered {before} -> {}", up.mean(arm));
        let mut down = b.clone();
        down.apply_rewards(&[arm], &[0.0]).unwrap();
        prop_assert!(down.mean(arm) <= before + 1e-12, "0 raised {before} -> {}", down.mean(arm));
    }

    /// The same rewards in any order and any batching give the same posterior.
    #[test]
    fn order_of_rewards_does_not_matter(
        priors in prop::collection::vec(prior(), 2..20),
        history in rewards(20),
        cut in 0usize..200,
        seed in any::<u64>(),
    ) {
        let n = priors.len();
        let pairs: Vec<(usize, f64)> = history.into_iter().map(|(a, v)| (a % n, v)).collect();
        let mut shuffled = pairs.clone();
        // Deterministic shuffle from the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut one = bernoulli(Policy::Thompson { exploitation: 1.0 }, &priors);
        let (a, v): (Vec<usize>, Vec<f64>) = pairs.iter().copied().unzip();
        one.apply_rewards(&a, &v).unwrap();
        let mut two = bernoulli(Policy::Thompson { exploitation: 1.0 }, &priors);
        let cut = cut.min(shuffled.len());
        for part in [&shuffled[..cut], &shuffled[cut..]] {
            let (a, v): (Vec<usize>, Vec<f64>) = part.iter().copied().unzip();
            two.apply_rewards(&a, &v).unwrap();
        }
        for arm in 0..n {
            prop_assert!((one.mean(arm) - two.mean(arm)).abs() <= 1e-12 * one.mean(arm).max(1e-300) + 1e-15);
            prop_assert!((one.stats[arm].n - two.stats[arm].n).abs() < 1e-9);
        }
    }

    /// Invalid input is refused with an error and leaves the state exactly as it was; no
    /// input makes the core panic.
    #[test]
    fn invalid_input_changes_nothing(
        priors in prop::collection::vec(prior(), 1..10),
        bad_arm in 10usize..1000,
        bad_value in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.5), Just(1.5)],
        bad_prior in prop_oneof![Just(-1.0), Just(0.0), Just(f64::NAN), Just(f64::INFINITY)],
    ) {
        let mut b = bernoulli(Policy::Thompson { exploitation: 1.0 }, &priors);
        b.apply_rewards(&[0], &[1.0]).unwrap();
        let snapshot = (b.stats.clone(), b.prior_a.clone(), b.prior_b.clone(), b.version);
        let mut rng = KernelRng::seed_from_u64(1);
        prop_assert!(b.apply_rewards(&[0, bad_arm], &[1.0, 1.0]).is_err());
        prop_assert!(b.apply_rewards(&[0, 0], &[1.0, bad_value]).is_err());
        prop_assert!(b.add_arms(&[1.0, bad_prior], &[1.0, 1.0]).is_err());
        prop_assert!(b.set_prior(0, bad_prior, 1.0).is_err());
        prop_assert!(b.set_prior(bad_arm, 1.0, 1.0).is_err());
        prop_assert!(b.set_stats(0, -1.0, 0.0, 0.0).is_err());
        prop_assert!(b.set_groups(&[0], -2.0).is_err());
        prop_assert!(b.choose(&mut rng, 0).is_err());
        prop_assert!(b.choose(&mut rng, priors.len() + 1).is_err());
        let ucb = Policy::Ucb1 { c: 1.0 };
        let bad_half_life = Bandit::new(RewardModel::Bernoulli, ucb, bad_prior).is_err();
        prop_assert!(bad_half_life || bad_prior == 0.0, "half_life {} accepted", bad_prior);
        let after = (b.stats.clone(), b.prior_a.clone(), b.prior_b.clone(), b.version);
        prop_assert_eq!(format!("{snapshot:?}"), format!("{after:?}"));
    }
}

/// Two experiments are separate objects: updating one never changes the other.
#[test]
fn experiments_are_independent() {
    let mut a = bernoulli(Policy::Thompson { exploitation: 1.0 }, &[(1.0, 1.0); 3]);
    let b = a.clone();
    a.apply_rewards(&[0, 1, 2], &[1.0, 0.0, 1.0]).unwrap();
    assert!(b.stats.iter().all(|st| st.n == 0.0 && st.sum == 0.0));
    assert_ne!(a.stats, b.stats);
}
