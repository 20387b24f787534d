//! Token selection from one position's logits, on the CPU in plain Rust:
//! repetition penalty, then temperature, top-k and top-p (the order
//! transformers applies them), then a draw from a seeded generator. A
//! temperature of 0 is greedy (argmax, first index on ties).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings with every default applied (see `validation`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResolvedSampling {
    pub temperature: f32,
    pub top_p: f32,
    /// `None`: no top-k cut.
    pub top_k: Option<u32>,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

pub(crate) struct Sampler {
    settings: ResolvedSampling,
    rng: StdRng,
}

impl Sampler {
    pub(crate) fn new(settings: ResolvedSampling) -> Self {
        let seed = settings.seed.unwrap_or_else(|| rand::rng().random());
        Sampler {
            settings,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Picks the next token. `history` is the prompt and what was generated,
    /// for the repetition penalty.
    pub(crate) fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        apply_repetition_penalty(logits, history, self.settings.repetition_penalty);
        if self.settings.temperature == 0.0 {
            return argmax(logits);
        }
        let candidates = self.candidates(logits);
        let total: f64 = candidates.iter().map(|(_, weight)| weight).sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (id, weight) in &candidates {
            if draw < *weight {
                return *id;
            }
            draw -= weight;
        }
        candidates
            .last()
            .map_or_else(|| argmax(logits), |(id, _)| *id)
    }

    /// The tokens that survive top-k and top-p, most likely first, with
    /// unnormalised probabilities.
    fn candidates(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let temperature = f64::from(self.settings.temperature);
        let mut ranked: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, logit)| !logit.is_nan())
            .map(|(id, &logit)| (id as u32, logit))
            .collect();
        let by_logit = |left: &(u32, f32), right: &(u32, f32)| {
            right.1.total_cmp(&left.1).then(left.0.cmp(&right.0))
        };
        if let Some(top_k) = self.settings.top_k.map(|top_k| top_k as usize)
            && top_k < ranked.len()
        {
            ranked.select_nth_unstable_by(top_k, by_logit);
            ranked.truncate(top_k);
        }
        ranked.sort_unstable_by(by_logit);
        let Some(&(_, best)) = ranked.first() else {
            return Vec::new();
        };
        let mut weighted: Vec<(u32, f64)> = ranked
            .iter()
            .map(|&(id, logit)| {
                (
                    id,
                    ((f64::from(logit) - f64::from(best)) / temperature).exp(),
                )
            })
            .collect();
        let top_p = f64::from(self.settings.top_p);
        if top_p < 1.0 {
            let total: f64 = weighted.iter().map(|(_, weight)| weight).sum();
            let mut cumulative = 0.0;
            let keep = weighted
                .iter()
                .position(|(_, weight)| {
                    cumulative += weight / total;
                    cumulative >= top_p
                })
                .map_or(weighted.len(), |index| index + 1);
            weighted.truncate(keep);
        }
        weighted
    }
}

/// Divides positive and multiplies negative logits of seen tokens by `penalty`.
fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let Some(logit) = logits.get_mut(id as usize) else {
            continue;
        };
        if std::mem::replace(&mut seen[id as usize], true) {
            continue;
        }
        *logit = if *logit > 0.0 {
            *logit / penalty
        } else {
            *logit * penalty
        };
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (id, logit) in logits.iter().enumerate() {
        if *logit > logits[best] {
            best = id;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(temperature: f32, top_p: f32, top_k: Option<u32>, seed: u64) -> ResolvedSampling {
        ResolvedSampling {
            temperature,
            top_p,
            top_k,
            repetition_penalty: 1.0,
            seed: Some(seed),
        }
    }

    fn draws(settings: ResolvedSampling, logits: &[f32], count: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(settings);
        (0..count)
            .map(|_| sampler.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(
            draws(settings(0.0, 1.0, None, 1), &[1.0, 3.0, 3.0, 2.0], 3),
            vec![1, 1, 1]
        );
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = [0.5, 0.4, 0.3, 0.2, 0.1];
        let first = draws(settings(1.0, 1.0, None, 42), &logits, 50);
        assert_eq!(first, draws(settings(1.0, 1.0, None, 42), &logits, 50));
        assert_ne!(first, draws(settings(1.0, 1.0, None, 43), &logits, 50));
    }

    #[test]
    fn top_k_and_top_p_limit_the_candidates() {
        let logits = [0.0, 5.0, 4.9, -1.0, 4.8];
        let top_k = draws(settings(1.0, 1.0, Some(2), 7), &logits, 200);
        assert!(top_k.iter().all(|id| [1, 2].contains(id)), "{top_k:?}");
        assert!(top_k.contains(&1) && top_k.contains(&2));
        // One token holds almost all the mass: top_p 0.5 keeps only it.
        let peaked = [10.0, 0.0, 0.0];
        assert_eq!(draws(settings(1.0, 0.5, None, 7), &peaked, 20), vec![0; 20]);
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [1.0, 0.0];
        let cold = draws(settings(0.05, 1.0, None, 3), &logits, 100);
        assert!(cold.iter().all(|&id| id == 0));
    }

    #[test]
    fn repetition_penalty_as_transformers_applies_it() {
        let mut logits = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 1], 2.0);
        assert_eq!(logits, vec![1.0, -4.0, 1.0]);
    }
}
