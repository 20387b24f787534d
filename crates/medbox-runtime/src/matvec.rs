//! Matrix products of a few rows on the CPU: the linear layers of a decode
//! step, which stream every weight from memory once per token.
//!
//! libtorch reads a bf16 weight matrix at about 16 GB/s with two threads on
//! an AVX2 CPU (its `bf16_dot_with_fp32_arith` widens and multiplies element
//! by element), and its int8 weight-only kernel is slower than f32 there.
//! A decode step of one stream spent most of its time in those kernels, well
//! short of the machine's read bandwidth. The loops here widen each block of
//! 16 weights once (bf16 by a shift, int8 by a conversion) and multiply it
//! into every row of the batch, so a weight is read from memory once per
//! step whatever the number of rows. They are plain Rust that the compiler
//! vectorises, compiled twice: for AVX2 with FMA, chosen at run time, and
//! for the baseline target.
//!
//! The output rows of the weight are split between the threads of
//! libtorch's own OpenMP team (`GOMP_parallel`, found in the process with
//! `dlsym`), so no thread is added next to libtorch's: its workers are the
//! ones that would otherwise spin between two of its operations.
//!
//! Numerics: products and sums in f32, in a different order from
//! libtorch's, so results differ from `linear` by f32 rounding only.

// The OpenMP bridge calls C functions found at run time and hands a
// reference through a `void *`; the kernels read the tensors' memory
// through slices made from their data pointers. Each `unsafe` block states
// why it is sound.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use tch::{Kind, TchError, Tensor};

/// Rows of the input multiplied together against one weight block.
const ROW_GROUP: usize = 4;
/// Parts of the output per thread; a part is a contiguous run of output
/// rows that one thread computes.
const PARTS_PER_THREAD: usize = 16;

/// A weight matrix (out, in), row-major, as the kernels read it.
#[derive(Clone, Copy)]
pub(crate) enum WeightRows<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
    /// Symmetric int8 with one scale per output row.
    Int8 {
        values: &'a [i8],
        scales: &'a [f32],
    },
}

/// `xs · weightᵀ` for `xs` of (rows, in) in any float kind, `weight` (out,
/// in) contiguous f32 or bf16 on the CPU, or int8 with `scales` (out) f32.
/// Returns (rows, out) in `xs`'s kind. The caller checks that the weight is
/// one of those and that `xs` is on the CPU.
pub(crate) fn linear(
    xs: &Tensor,
    weight: &Tensor,
    scales: Option<&Tensor>,
) -> Result<Tensor, TchError> {
    let size = xs.size();
    let in_features = *size.last().unwrap_or(&0);
    let (out_features, weight_in) = match weight.size().as_slice() {
        [out, inner] => (*out, *inner),
        other => return Err(TchError::Shape(format!("matvec weight of shape {other:?}"))),
    };
    if weight_in != in_features || in_features == 0 || !weight.is_contiguous() {
        return Err(TchError::Shape(format!(
            "matvec of {size:?} by a weight of {:?} (contiguous: {})",
            weight.size(),
            weight.is_contiguous()
        )));
    }
    let rows = xs.numel() as i64 / in_features;
    let kind = xs.f_kind()?;
    let inputs = xs
        .f_reshape([rows, in_features])?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    // (out, rows): each thread writes one contiguous range of it.
    let mut output = Tensor::f_empty([out_features, rows], (Kind::Float, tch::Device::Cpu))?;
    {
        let inputs = float_slice(&inputs)?;
        let out = float_slice_mut(&mut output)?;
        let weights = match (weight.f_kind()?, scales) {
            (Kind::Float, None) => WeightRows::F32(float_slice(weight)?),
            (Kind::BFloat16, None) => WeightRows::Bf16(bf16_slice(weight)?),
            (Kind::Int8, Some(scales)) => WeightRows::Int8 {
                values: int8_slice(weight)?,
                scales: float_slice(scales)?,
            },
            (other, _) => {
                return Err(TchError::Kind(format!("matvec weights of kind {other:?}")));
            }
        };
        multiply(weights, in_features as usize, inputs, out);
    }
    let mut shape = size;
    if let Some(last) = shape.last_mut() {
        *last = out_features;
    }
    let output = if rows == 1 {
        output
    } else {
        output.f_transpose(0, 1)?.f_contiguous()?
    };
    output.f_reshape(shape.as_slice())?.f_to_kind(kind)
}

/// Whether [`linear`] can multiply by weights of `kind` (with int8 scales).
pub(crate) fn supports(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Int8)
}

/// Whether this CPU runs the vectorised loops (x86-64 with AVX2 and FMA).
/// Elsewhere [`linear`] still computes, in plain loops that libtorch beats.
pub(crate) fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        kernel::avx2::detected()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[o · rows + r] = Σᵢ weight[o, i] · inputs[r · in + i]`, over every
/// output row `o` of the weight, split between the OpenMP team's threads.
fn multiply(weights: WeightRows<'_>, in_features: usize, inputs: &[f32], out: &mut [f32]) {
    let rows = inputs.len() / in_features;
    let out_features = out.len() / rows.max(1);
    if rows == 0 || out_features == 0 {
        return;
    }
    let threads = team::max_threads();
    let parts = (threads * PARTS_PER_THREAD).min(out_features);
    let per_part = out_features.div_ceil(parts);
    let chunks: Vec<Mutex<(usize, &mut [f32])>> = out
        .chunks_mut(per_part * rows)
        .enumerate()
        .map(|(index, chunk)| Mutex::new((index * per_part, chunk)))
        .collect();
    let inputs = kernel::prepare(weights, inputs, in_features);
    let inputs: Vec<&[f32]> = inputs.chunks_exact(in_features).collect();
    let next = AtomicUsize::new(0);
    // Threads claim parts in turn, so one delayed thread (another process
    // on its core) does not hold the others back.
    let work = |_thread: usize, _team_size: usize| {
        while let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
            // Each part is claimed by exactly one thread: no contention.
            let mut guard = chunk.lock().unwrap_or_else(|poison| poison.into_inner());
            let (first, out) = &mut *guard;
            kernel::rows(weights, in_features, *first, &inputs, out);
        }
    };
    team::run(threads, &work);
}

fn float_slice(tensor: &Tensor) -> Result<&[f32], TchError> {
    check(tensor, Kind::Float)?;
    // SAFETY: `check` proved a contiguous f32 CPU tensor of `numel`
    // elements; the slice borrows `tensor`, which keeps the storage alive.
    Ok(unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const f32, tensor.numel()) })
}

fn float_slice_mut(tensor: &mut Tensor) -> Result<&mut [f32], TchError> {
    check(tensor, Kind::Float)?;
    // SAFETY: as in `float_slice`; the tensor was created by the caller and
    // is borrowed mutably, so nothing else reads or writes it meanwhile.
    Ok(unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut f32, tensor.numel()) })
}

fn bf16_slice(tensor: &Tensor) -> Result<&[u16], TchError> {
    check(tensor, Kind::BFloat16)?;
    // SAFETY: as in `float_slice`, for 2-byte elements.
    Ok(unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const u16, tensor.numel()) })
}

fn int8_slice(tensor: &Tensor) -> Result<&[i8], TchError> {
    check(tensor, Kind::Int8)?;
    // SAFETY: as in `float_slice`, for 1-byte elements.
    Ok(unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const i8, tensor.numel()) })
}

fn check(tensor: &Tensor, kind: Kind) -> Result<(), TchError> {
    if tensor.f_kind()? != kind || tensor.device() != tch::Device::Cpu || !tensor.is_contiguous() {
        return Err(TchError::Kind(format!(
            "matvec needs a contiguous {kind:?} CPU tensor, got {:?} on {:?}",
            tensor.f_kind()?,
            tensor.device()
        )));
    }
    Ok(())
}

/// The loops: AVX2 with FMA where the CPU has them (chosen at run time),
/// plain Rust elsewhere.
mod kernel {
    use std::borrow::Cow;

    use super::{ROW_GROUP, WeightRows};

    /// The inputs in the order the kernel reads them (bf16 weights on AVX2
    /// widen 16 at a time into an interleaved order; the inputs are
    /// reordered once per product to match).
    pub(super) fn prepare<'a>(
        weights: WeightRows<'_>,
        inputs: &'a [f32],
        in_features: usize,
    ) -> Cow<'a, [f32]> {
        #[cfg(target_arch = "x86_64")]
        if matches!(weights, WeightRows::Bf16(_)) && avx2::detected() {
            return Cow::Owned(avx2::interleave_for_bf16(inputs, in_features));
        }
        let _ = (weights, in_features);
        Cow::Borrowed(inputs)
    }

    /// Output rows `first..` of the product into `out` ((count, rows)), from
    /// input rows made by [`prepare`].
    pub(super) fn rows(
        weights: WeightRows<'_>,
        in_features: usize,
        first: usize,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) {
        for (offset, outputs) in out.chunks_exact_mut(inputs.len()).enumerate() {
            let index = first + offset;
            let span = index * in_features..(index + 1) * in_features;
            for (group, targets) in inputs.chunks(ROW_GROUP).zip(outputs.chunks_mut(ROW_GROUP)) {
                match weights {
                    WeightRows::F32(values) => dot(&values[span.clone()], group, 1.0, targets),
                    WeightRows::Bf16(values) => dot(&values[span.clone()], group, 1.0, targets),
                    WeightRows::Int8 { values, scales } => {
                        dot(&values[span.clone()], group, scales[index], targets)
                    }
                }
            }
        }
    }

    /// One weight element, widened to f32 alone or 16 at a time.
    pub(super) trait Element: Copy {
        fn widen(self) -> f32;

        /// Elements `16 · block ..` of `weights` as two vectors of 8 f32.
        ///
        /// # Safety
        /// AVX2 is present and `16 · (block + 1) <= weights.len()`.
        #[cfg(target_arch = "x86_64")]
        unsafe fn widen_block(
            weights: &[Self],
            block: usize,
        ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256);
    }

    impl Element for f32 {
        fn widen(self) -> f32 {
            self
        }

        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn widen_block(
            weights: &[f32],
            block: usize,
        ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
            use std::arch::x86_64::*;
            // SAFETY: in bounds by the caller's contract.
            unsafe {
                let at = weights.as_ptr().add(block * 16);
                (_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8)))
            }
        }
    }

    impl Element for u16 {
        fn widen(self) -> f32 {
            f32::from_bits(u32::from(self) << 16)
        }

        /// In the order 0–3, 8–11 then 4–7, 12–15 (see
        /// `avx2::interleave_for_bf16`).
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn widen_block(
            weights: &[u16],
            block: usize,
        ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
            use std::arch::x86_64::*;
            // SAFETY: in bounds by the caller's contract. A bf16 is the top
            // half of an f32: interleaving zeros below each one widens it
            // exactly.
            unsafe {
                let raw = _mm256_loadu_si256(weights.as_ptr().add(block * 16).cast());
                let zero = _mm256_setzero_si256();
                (
                    _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)),
                    _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw)),
                )
            }
        }
    }

    impl Element for i8 {
        fn widen(self) -> f32 {
            f32::from(self)
        }

        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn widen_block(
            weights: &[i8],
            block: usize,
        ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
            use std::arch::x86_64::*;
            // SAFETY: in bounds by the caller's contract.
            unsafe {
                let raw = _mm_loadu_si128(weights.as_ptr().add(block * 16).cast());
                (
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(raw, raw))),
                )
            }
        }
    }

    /// `targets[r] = scale · weight · group[r]` for up to [`ROW_GROUP`] rows.
    fn dot<W: Element>(weight: &[W], group: &[&[f32]], scale: f32, targets: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::detected() {
            // Every row count unrolls by the same `UNROLL`, so a row's sum
            // is the same operations whatever the other rows are.
            match group {
                // SAFETY: AVX2 and FMA are present (checked above); every
                // input row has the weight's length (`rows` cut them so).
                [a] => return unsafe { avx2::dot::<W, 1>(weight, [a], scale, targets) },
                [a, b] => return unsafe { avx2::dot::<W, 2>(weight, [a, b], scale, targets) },
                [a, b, c] => {
                    return unsafe { avx2::dot::<W, 3>(weight, [a, b, c], scale, targets) };
                }
                [a, b, c, d] => {
                    return unsafe { avx2::dot::<W, 4>(weight, [a, b, c, d], scale, targets) };
                }
                _ => {}
            }
        }
        for (input, target) in group.iter().zip(targets.iter_mut()) {
            let total: f32 = weight
                .iter()
                .zip(input.iter())
                .map(|(w, x)| w.widen() * x)
                .sum();
            *target = total * scale;
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) mod avx2 {
        use std::arch::x86_64::*;

        use super::Element;

        const BLOCK: usize = 16;

        pub(in super::super) fn detected() -> bool {
            use std::sync::OnceLock;
            static DETECTED: OnceLock<bool> = OnceLock::new();
            *DETECTED.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            })
        }

        /// Each full block of 16 inputs in the order of
        /// `_mm256_unpack{lo,hi}_epi16`: 0–3, 8–11, 4–7, 12–15.
        pub(super) fn interleave_for_bf16(inputs: &[f32], in_features: usize) -> Vec<f32> {
            let mut out = inputs.to_vec();
            for row in out.chunks_exact_mut(in_features) {
                for block in row.as_chunks_mut::<BLOCK>().0 {
                    let b = *block;
                    *block = [
                        b[0], b[1], b[2], b[3], b[8], b[9], b[10], b[11], b[4], b[5], b[6], b[7],
                        b[12], b[13], b[14], b[15],
                    ];
                }
            }
            out
        }

        /// Blocks per iteration, each with accumulators of its own, so that
        /// one row still keeps enough independent multiply-adds in flight.
        const UNROLL: usize = 2;

        /// `targets[r] = scale · Σᵢ weight[i] · inputs[r][i]` for `R` rows;
        /// each block of weights is widened once for all of them.
        ///
        /// # Safety
        /// AVX2 and FMA are present, and every input has `weight.len()`
        /// elements.
        // One index addresses a block in the weights, the inputs and the
        // accumulators alike.
        #[allow(clippy::needless_range_loop)]
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn dot<W: Element, const R: usize>(
            weight: &[W],
            inputs: [&[f32]; R],
            scale: f32,
            targets: &mut [f32],
        ) {
            let n = weight.len();
            let blocks = n / BLOCK;
            let mut sums = [[[_mm256_setzero_ps(); 2]; UNROLL]; R];
            let mut block = 0;
            while block + UNROLL <= blocks {
                for u in 0..UNROLL {
                    // SAFETY: block + u < n / 16, and each input has n
                    // elements.
                    unsafe {
                        let (low, high) = W::widen_block(weight, block + u);
                        for r in 0..R {
                            let at = inputs[r].as_ptr().add((block + u) * BLOCK);
                            let sum = &mut sums[r][u];
                            sum[0] = _mm256_fmadd_ps(low, _mm256_loadu_ps(at), sum[0]);
                            sum[1] = _mm256_fmadd_ps(high, _mm256_loadu_ps(at.add(8)), sum[1]);
                        }
                    }
                }
                block += UNROLL;
            }
            while block < blocks {
                // SAFETY: as above.
                unsafe {
                    let (low, high) = W::widen_block(weight, block);
                    for r in 0..R {
                        let at = inputs[r].as_ptr().add(block * BLOCK);
                        let sum = &mut sums[r][0];
                        sum[0] = _mm256_fmadd_ps(low, _mm256_loadu_ps(at), sum[0]);
                        sum[1] = _mm256_fmadd_ps(high, _mm256_loadu_ps(at.add(8)), sum[1]);
                    }
                }
                block += 1;
            }
            for r in 0..R {
                let mut vector = _mm256_setzero_ps();
                for sum in &sums[r] {
                    vector = _mm256_add_ps(vector, _mm256_add_ps(sum[0], sum[1]));
                }
                let mut total = horizontal_sum(vector);
                for i in blocks * BLOCK..n {
                    total += weight[i].widen() * inputs[r][i];
                }
                targets[r] = total * scale;
            }
        }

        #[target_feature(enable = "avx2,fma")]
        fn horizontal_sum(v: __m256) -> f32 {
            let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
        }
    }
}

/// libtorch's OpenMP team, driven from Rust.
mod team {
    use super::*;

    type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
    type Query = unsafe extern "C" fn() -> c_int;

    struct Api {
        parallel: Parallel,
        thread_num: Query,
        num_threads: Query,
        max_threads: Query,
    }

    fn api() -> Option<&'static Api> {
        static API: OnceLock<Option<Api>> = OnceLock::new();
        API.get_or_init(|| {
            let found = find();
            if found.is_none() {
                tracing::warn!(
                    "libtorch's OpenMP runtime (GOMP_parallel) was not found: decode matrix \
                     products run on one thread"
                );
            }
            found
        })
        .as_ref()
    }

    fn find() -> Option<Api> {
        let symbol = |name: &std::ffi::CStr| {
            // SAFETY: dlsym with RTLD_DEFAULT only looks a name up among
            // the objects already loaded; a null result is handled.
            let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!address.is_null()).then_some(address)
        };
        let parallel = symbol(c"GOMP_parallel")?;
        let thread_num = symbol(c"omp_get_thread_num")?;
        let num_threads = symbol(c"omp_get_num_threads")?;
        let max_threads = symbol(c"omp_get_max_threads")?;
        // SAFETY: these are the OpenMP runtime's documented entry points,
        // with these C signatures (libgomp's ABI, also exported by LLVM's and
        // Intel's OpenMP runtimes).
        unsafe {
            Some(Api {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
                thread_num: std::mem::transmute::<*mut c_void, Query>(thread_num),
                num_threads: std::mem::transmute::<*mut c_void, Query>(num_threads),
                max_threads: std::mem::transmute::<*mut c_void, Query>(max_threads),
            })
        }
    }

    /// The threads a parallel region started here would have: libtorch's
    /// thread count for the calling thread.
    pub(super) fn max_threads() -> usize {
        match api() {
            // SAFETY: a plain query of the calling thread's OpenMP setting.
            Some(api) => usize::try_from(unsafe { (api.max_threads)() })
                .unwrap_or(1)
                .max(1),
            None => 1,
        }
    }

    type Work<'a> = &'a (dyn Fn(usize, usize) + Sync);

    /// Runs `work(thread, team_size)` on every thread of a team of up to
    /// `threads` (the calling thread is thread 0) and returns when all are
    /// done.
    pub(super) fn run(threads: usize, work: Work<'_>) {
        let api = match api() {
            Some(api) if threads > 1 => api,
            _ => return work(0, 1),
        };
        extern "C" fn trampoline(data: *mut c_void) {
            // SAFETY: `data` is the `&Work` that `run` passed below, alive
            // until `GOMP_parallel` returns, which is after every thread
            // has left this function.
            let (work, api) = unsafe { *(data as *const (Work<'_>, &Api)) };
            // SAFETY: plain queries of the calling team thread.
            let (thread, team) = unsafe { ((api.thread_num)(), (api.num_threads)()) };
            work(
                usize::try_from(thread).unwrap_or(0),
                usize::try_from(team).unwrap_or(1).max(1),
            );
        }
        let mut payload: (Work<'_>, &Api) = (work, api);
        // SAFETY: GOMP_parallel runs `trampoline(data)` on each thread of a
        // new team and joins them before it returns, so `payload` outlives
        // every use. The work does not unwind (a panic in an `extern "C"`
        // function aborts the process).
        unsafe {
            (api.parallel)(
                trampoline,
                (&mut payload as *mut (Work<'_>, &Api)).cast(),
                c_uint::try_from(threads).unwrap_or(1),
                0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(xs: &Tensor, weight: &Tensor) -> Tensor {
        xs.to_kind(Kind::Double)
            .linear(&weight.to_kind(Kind::Double), None::<Tensor>)
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[])
    }

    #[test]
    fn every_weight_kind_and_row_count_matches_a_double_product() {
        tch::manual_seed(7);
        // 100 inputs: six blocks of 16 and a tail of 4.
        for rows in [1, 2, 3, 4, 5, 9] {
            let xs = Tensor::randn([rows, 100], (Kind::Float, tch::Device::Cpu));
            let weight = Tensor::randn([37, 100], (Kind::Float, tch::Device::Cpu));
            let expected = reference(&xs, &weight);
            let got = linear(&xs, &weight, None).unwrap();
            assert_eq!(got.size(), [rows, 37]);
            assert!(max_difference(&got, &expected) < 1e-4, "f32, {rows} rows");

            let bf16 = weight.to_kind(Kind::BFloat16);
            let expected = reference(&xs, &bf16);
            let got = linear(&xs, &bf16, None).unwrap();
            assert!(max_difference(&got, &expected) < 1e-4, "bf16, {rows} rows");

            let scales = Tensor::rand([37], (Kind::Float, tch::Device::Cpu)) + 0.5;
            let values = Tensor::randint_low(-127, 128, [37, 100], (Kind::Int64, tch::Device::Cpu))
                .to_kind(Kind::Int8);
            let dequantized = values.to_kind(Kind::Float) * scales.unsqueeze(1);
            let expected = reference(&xs, &dequantized);
            let got = linear(&xs, &values, Some(&scales)).unwrap();
            assert!(max_difference(&got, &expected) < 1e-2, "int8, {rows} rows");
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_among_others() {
        tch::manual_seed(11);
        // 1000 inputs: an odd number of blocks and a tail.
        let xs = Tensor::randn([7, 1000], (Kind::Float, tch::Device::Cpu));
        let weight = Tensor::randn([300, 1000], (Kind::Float, tch::Device::Cpu));
        let scales = Tensor::rand([300], (Kind::Float, tch::Device::Cpu)) + 0.5;
        let int8 = (&weight * 20).clamp(-127, 127).to_kind(Kind::Int8);
        let bf16 = weight.to_kind(Kind::BFloat16);
        for (weight, scales) in [(&weight, None), (&bf16, None), (&int8, Some(&scales))] {
            let together = linear(&xs, weight, scales).unwrap();
            for row in 0..7 {
                let alone = linear(&xs.narrow(0, row, 1), weight, scales).unwrap();
                let pair = linear(&xs.narrow(0, row.min(5), 2), weight, scales).unwrap();
                let among = together.narrow(0, row, 1);
                assert!(alone.equal(&among), "{:?}, row {row}", weight.kind());
                let in_pair = pair.narrow(0, row - row.min(5), 1);
                assert!(alone.equal(&in_pair), "{:?}, row {row}", weight.kind());
            }
        }
    }

    #[test]
    fn leading_dimensions_and_the_input_kind_are_kept() {
        let xs = Tensor::randn([2, 3, 32], (Kind::BFloat16, tch::Device::Cpu));
        let weight = Tensor::randn([8, 32], (Kind::BFloat16, tch::Device::Cpu));
        let got = linear(&xs, &weight, None).unwrap();
        assert_eq!(got.size(), [2, 3, 8]);
        assert_eq!(got.kind(), Kind::BFloat16);
        let expected = xs
            .to_kind(Kind::Float)
            .linear(&weight.to_kind(Kind::Float), None::<Tensor>);
        assert!(max_difference(&got, &expected) < 0.1);
    }

    #[test]
    fn a_mismatched_weight_is_an_error() {
        let xs = Tensor::randn([1, 32], (Kind::Float, tch::Device::Cpu));
        let weight = Tensor::randn([8, 16], (Kind::Float, tch::Device::Cpu));
        assert!(linear(&xs, &weight, None).is_err());
        let strided = Tensor::randn([32, 8], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
        assert!(linear(&xs, &strided, None).is_err());
        let half = Tensor::randn([8, 32], (Kind::Half, tch::Device::Cpu));
        assert!(linear(&xs, &half, None).is_err());
    }
}
