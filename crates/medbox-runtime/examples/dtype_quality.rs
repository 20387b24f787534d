//! How close a reduced-precision dtype keeps a model to f32, measured as
//! the performance notes ask: over 256 positions fed token by token
//! (the decode path), the lowest cosine between a position's logits and
//! f32's, and at how many positions the top token is the same.
//!
//! ```text
//! cargo run --release -p medbox-runtime --example dtype_quality -- MODEL_DIR [DTYPE...]
//! ```

use std::path::PathBuf;

use medbox_runtime::{DType, Device, debug};

const POSITIONS: usize = 256;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut arguments = std::env::args().skip(1);
    let path = PathBuf::from(arguments.next().ok_or("usage: MODEL_DIR [DTYPE...]")?);
    let mut dtypes: Vec<DType> = arguments
        .map(|name| name.parse())
        .collect::<Result<_, _>>()?;
    if dtypes.is_empty() {
        dtypes = vec![DType::BF16, DType::Int8];
    }
    // Ids spread over the low vocabulary, fixed so that runs compare.
    let ids: Vec<u32> = (0..POSITIONS as u32)
        .map(|index| (index * 7919 + 13) % 1900 + 3)
        .collect();
    let exact = debug::prompt_logits(&path, DType::F32, Device::Cpu, &ids, POSITIONS)?;
    for dtype in dtypes {
        let approximate = debug::prompt_logits(&path, dtype, Device::Cpu, &ids, 1)?;
        let mut min_cosine = f64::MAX;
        let mut agree = 0;
        for (exact, approximate) in exact.iter().zip(&approximate) {
            let dot: f64 = exact
                .iter()
                .zip(approximate)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            min_cosine = min_cosine.min(dot / (norm(exact) * norm(approximate)));
            agree += usize::from(argmax(exact) == argmax(approximate));
        }
        println!(
            "{dtype} against f32 over {POSITIONS} positions: min cosine {min_cosine:.5}, \
             top-1 agreement {agree}/{POSITIONS} ({:.1}%)",
            100.0 * agree as f64 / POSITIONS as f64
        );
    }
    Ok(())
}

fn norm(row: &[f32]) -> f64 {
    row.iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn argmax(row: &[f32]) -> Option<usize> {
    row.iter()
        .enumerate()
        .max_by(|left, right| left.1.total_cmp(right.1))
        .map(|(index, _)| index)
}
