//! Policy and reward-model configuration, validated once at construction.

use crate::error::CoreError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardModel {
    /// Rewards in [0, 1]; Beta–Bernoulli posterior.
    Bernoulli,
    /// Any finite reward; Normal–Inverse-Gamma posterior.
    Gaussian,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Thompson sampling; `exploitation` sharpens the posterior (1 = plain).
    Thompson { exploitation: f64 },
    /// UCB1 index: mean + c · sqrt(2 ln t / n).
    Ucb1 { c: f64 },
    /// KL-UCB (Bernoulli): the largest q with n · KL(mean, q) <= ln t + c · ln ln t.
    KlUcb { c: f64 },
    /// With probability ε a uniformly random arm, else the best mean. With `decay` > 0,
    /// ε_t = ε · decay / (decay + t).
    EpsilonGreedy { epsilon: f64, decay: f64 },
    /// Boltzmann exploration over posterior means at `temperature`.
    Softmax { temperature: f64 },
    /// Always the best posterior mean.
    Greedy,
    /// Every active arm equally likely (control and holdout traffic).
    Uniform,
}

fn positive_finite(name: &str, v: f64) -> Result<f64, CoreError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(CoreError::invalid(format!(
            "{name} must be a finite number > 0, got {v}"
        )))
    }
}

impl Policy {
    /// Builds a policy from its name and parameters; zero means "use the default".
    pub fn parse(
        name: &str,
        exploitation: f64,
        epsilon: f64,
        epsilon_decay: f64,
        temperature: f64,
        ucb_c: f64,
    ) -> Result<Policy, CoreError> {
        let or_default = |v: f64, d: f64| if v == 0.0 { d } else { v };
        match name {
            "thompson" | "" => Ok(Policy::Thompson {
                exploitation: positive_finite("exploitation", or_default(exploitation, 1.0))?,
            }),
            "ucb1" => Ok(Policy::Ucb1 {
                c: positive_finite("ucb_c", or_default(ucb_c, 1.0))?,
            }),
            "kl_ucb" => {
                if !(ucb_c.is_finite() && ucb_c >= 0.0) {
                    return Err(CoreError::invalid(format!(
                        "ucb_c must be >= 0 for kl_ucb, got {ucb_c}"
                    )));
                }
                Ok(Policy::KlUcb { c: ucb_c })
            }
            "epsilon_greedy" => {
                let epsilon = or_default(epsilon, 0.1);
                if !(0.0..=1.0).contains(&epsilon) {
                    return Err(CoreError::invalid(format!(
                        "epsilon must be in [0, 1], got {epsilon}"
                    )));
                }
                if !(epsilon_decay.is_finite() && epsilon_decay >= 0.0) {
                    return Err(CoreError::invalid(format!(
                        "epsilon_decay must be >= 0, got {epsilon_decay}"
                    )));
                }
                Ok(Policy::EpsilonGreedy {
                    epsilon,
                    decay: epsilon_decay,
                })
            }
            "softmax" => Ok(Policy::Softmax {
                temperature: positive_finite("temperature", or_default(temperature, 0.1))?,
            }),
            "greedy" => Ok(Policy::Greedy),
            "uniform" => Ok(Policy::Uniform),
            other => Err(CoreError::invalid(format!(
                "unknown policy {other:?}; expected one of thompson, ucb1, kl_ucb, \
                 epsilon_greedy, softmax, greedy, uniform"
            ))),
        }
    }
}
