//! Thompson top-1 vs top-10 in pure Rust, without Python's per-call overhead, in the three
//! worlds of `make bench` (spread, ~3% CTR, near-equal arms): medians of interleaved batches.
//! Run: `cargo run --release --example kernel_slates -- [arms]` (default 1,000).

use _core::bandit::{Bandit, ThompsonPath};
use _core::kernel::KernelRng;
use _core::policy::{Policy, RewardModel};
use std::time::Instant;

fn world(name: &str, n: usize, seed: &mut u64) -> (Vec<f64>, Vec<f64>) {
    let mut u = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut a = vec![];
    let mut b = vec![];
    for _ in 0..n {
        match name {
            "spread" => {
                a.push(1.0 + 499.0 * u());
                b.push(1.0 + 4999.0 * u());
            }
            "ctr3" => {
                let pulls = 100.0 + 9900.0 * u();
                let rate = 0.02 + 0.02 * u();
                let clicks = (pulls * rate).round();
                a.push(1.0 + clicks);
                b.push(1.0 + pulls - clicks);
            }
            _ => {
                a.push(31.0 + u());
                b.push(971.0 + u());
            }
        }
    }
    (a, b)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1000);
    let worlds = ["spread", "ctr3", "equal"];
    let mut seed = 1u64;
    let mut bds: Vec<Bandit> = worlds
        .iter()
        .map(|w| {
            let (a, b) = world(w, n, &mut seed);
            let mut bd = Bandit::new(
                RewardModel::Bernoulli,
                Policy::Thompson { exploitation: 1.0 },
                0.0,
            )
            .unwrap();
            bd.add_arms(&a, &b).unwrap();
            bd.path = ThompsonPath::Full;
            bd
        })
        .collect();
    let mut rng = KernelRng::seed_from_u64(7);
    let mut times = vec![vec![]; 6];
    for _ in 0..400 {
        for (wi, bd) in bds.iter_mut().enumerate() {
            for (ki, k) in [1usize, 10].iter().enumerate() {
                let t = Instant::now();
                for _ in 0..200 {
                    std::hint::black_box(bd.choose(&mut rng, *k).unwrap());
                }
                times[wi * 2 + ki].push(t.elapsed().as_secs_f64() / 200.0 * 1e6);
            }
        }
    }
    for (wi, w) in worlds.iter().enumerate() {
        let mut m = [0.0; 2];
        for ki in 0..2 {
            let v = &mut times[wi * 2 + ki];
            v.sort_by(|x, y| x.partial_cmp(y).unwrap());
            m[ki] = v[v.len() / 2];
        }
        println!(
            "{w:7} top1 {:.3} top10 {:.3} delta {:.3} ratio {:.3}",
            m[0],
            m[1],
            m[1] - m[0],
            m[1] / m[0]
        );
    }
}
