//! [`MatmulOps`] on the CubeCL backends: the matmul `DAPT_MATMUL` names, launched through
//! cubek's `launch_ref` as burn-cubecl's own (crate-private) `launch_matmul` does for
//! unquantized tensors (burn-cubecl-0.21.0 `src/kernel/matmul/base.rs`), with the strategy
//! chosen here instead of Burn's default.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{FloatDType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::element::BoolElement;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubek::matmul::components::tile::TileMatmulKind;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems, MatmulSetupError};
use cubek::matmul::launch::{launch_ref, Strategy};
use cubek::matmul::routines::double_buffering::DoubleBufferingArgs;
use cubek::matmul::routines::double_unit::DoubleUnitSelectionArgs;
use cubek::matmul::routines::ordered_double_buffering::OrderedSelectionArgs;
use cubek::matmul::routines::simple::SimpleArgs;
use cubek::matmul::routines::simple_unit::SimpleUnitSelectionArgs;
use cubek::matmul::routines::{BlueprintStrategy, TileSizeSelection};
use cubek::std::InputBinding;

use super::output;
use crate::fused::matmul::{MatmulChoice, MatmulOps};

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MatmulOps
    for CubeBackend<R, F, I, BT>
{
    fn matmul_by(choice: MatmulChoice, lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
        if choice == MatmulChoice::Burn {
            return Self::float_matmul(lhs, rhs);
        }
        // A hash, not a formatted string: this runs on every matmul of the step.
        let key = problem_key(choice, &lhs, &rhs);
        let verdicts = || VERDICTS.lock().unwrap_or_else(PoisonError::into_inner);
        let verdict = verdicts().get(&key).copied();
        if verdict == Some(false) {
            return Self::float_matmul(lhs, rhs);
        }
        match matmul_with(choice, lhs.clone(), rhs.clone()) {
            Ok(out) if verdict == Some(true) => out,
            // A problem not seen before: checked against Burn's matmul (until the check can
            // tell: not on all-zero or non-finite values, which say nothing).
            Ok(out) => {
                let reference = Self::float_matmul(lhs.clone(), rhs.clone());
                match relative_difference::<Self>(out.clone(), reference.clone()) {
                    Some(diff) if diff <= MATMUL_CHECK_RTOL => {
                        verdicts().insert(key, true);
                        out
                    }
                    Some(diff) => {
                        tracing::error!(problem = %describe(choice, &lhs, &rhs), relative_difference = diff, "DAPT_MATMUL strategy gives a wrong result for this matmul: Burn's runs it from now on");
                        verdicts().insert(key, false);
                        reference
                    }
                    None => reference,
                }
            }
            Err(err) => {
                tracing::warn!(problem = %describe(choice, &lhs, &rhs), error = ?err, "DAPT_MATMUL strategy cannot take this matmul: Burn's runs it");
                verdicts().insert(key, false);
                Self::float_matmul(lhs, rhs)
            }
        }
    }
}

/// How far a strategy's result may be from Burn's, relative to Burn's largest value, before it
/// is taken as wrong: bf16 rounding of two different summation orders stays near 2^-8 of an
/// element; cubek 0.2's `DoubleUnit` gave 0.40 on `[3, 64, 40] @ [3, 40, 16]` (lavapipe, f32),
/// which is why every new problem is checked.
pub const MATMUL_CHECK_RTOL: f32 = 1e-2;

/// Each problem's verdict for the process's strategy (by [`problem_key`]): `true` checked
/// right, `false` refused by cubek or wrong (Burn's matmul runs it).
static VERDICTS: Mutex<BTreeMap<u64, bool>> = Mutex::new(BTreeMap::new());

/// The strategy, shapes, strides and dtype of a matmul, hashed: what a verdict holds for.
fn problem_key<R: CubeRuntime>(
    choice: MatmulChoice,
    lhs: &CubeTensor<R>,
    rhs: &CubeTensor<R>,
) -> u64 {
    let mut h = DefaultHasher::new();
    (choice, lhs.dtype, rhs.dtype).hash(&mut h);
    for t in [lhs, rhs] {
        t.meta.shape().as_slice().hash(&mut h);
        t.meta.strides()[..].hash(&mut h);
    }
    h.finish()
}

/// The problem [`problem_key`] hashes, for the log.
fn describe<R: CubeRuntime>(
    choice: MatmulChoice,
    lhs: &CubeTensor<R>,
    rhs: &CubeTensor<R>,
) -> String {
    format!(
        "{} {:?}/{:?} @ {:?}/{:?} {:?}",
        choice.name(),
        lhs.shape(),
        lhs.meta.strides(),
        rhs.shape(),
        rhs.meta.strides(),
        lhs.dtype
    )
}

/// `max |a - b| / max |b|` in f32 over two tensors of one shape (read back: synchronises);
/// `None` when `b` is all zeros or either holds a non-finite value (nothing to judge by).
fn relative_difference<B: burn::tensor::backend::Backend>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
) -> Option<f32> {
    let flat = |t: FloatTensor<B>| {
        let n = t.shape().num_elements();
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(t, Shape::new([n]))))
            .cast(FloatDType::F32)
    };
    let (a, b) = (flat(a), flat(b));
    // Both maxima in one read-back.
    let both = Tensor::cat(vec![b.clone().abs().max(), (a - b).abs().max()], 0)
        .into_data()
        .into_vec::<f32>()
        .unwrap_or_default();
    let [scale, diff] = both[..] else {
        return None;
    };
    (scale > 0.0 && scale.is_finite() && diff.is_finite()).then(|| diff / scale)
}

/// Why a strategy did not run a matmul.
#[derive(Debug)]
pub enum MatmulRefusal {
    /// cubek's setup error: layout, alignment, size, or hardware (the tensor-core strategies
    /// need a GPU with them).
    Cubek(MatmulSetupError),
    /// Batch dimensions that differ (a broadcast): Burn's matmul broadcasts, the strategies
    /// take equal ones.
    Broadcast(String),
    /// cuBLAS's: no library, a dtype or layout it cannot take in place, not the CUDA backend,
    /// or a CUDA or cuBLAS error.
    Cublas(String),
}

impl From<MatmulSetupError> for MatmulRefusal {
    fn from(e: MatmulSetupError) -> Self {
        MatmulRefusal::Cubek(e)
    }
}

/// `lhs [.., m, k] @ rhs [.., k, n]` (equal batch dimensions; either side may be a transposed
/// view) by cubek's strategy for `choice`, or cuBLAS (Burn's own matmul for
/// [`MatmulChoice::Burn`]), into a new contiguous `[.., m, n]` tensor in `lhs`'s dtype,
/// accumulating in f32.
///
/// # Errors
/// [`MatmulRefusal`]: the strategy cannot take this problem.
///
/// # Panics
/// If the ranks or the inner dimensions disagree.
pub fn matmul_with<R: CubeRuntime>(
    choice: MatmulChoice,
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
) -> Result<CubeTensor<R>, MatmulRefusal> {
    let (ls, rs) = (lhs.shape(), rhs.shape());
    let d = ls.num_dims();
    assert!(
        d >= 2 && rs.num_dims() == d,
        "matmul: ranks {ls:?} and {rs:?}"
    );
    assert_eq!(
        ls[d - 1],
        rs[d - 2],
        "matmul: inner dimensions {ls:?} @ {rs:?}"
    );
    if ls[..d - 2] != rs[..d - 2] {
        return Err(MatmulRefusal::Broadcast(format!("{ls:?} @ {rs:?}")));
    }
    if choice == MatmulChoice::Cublas {
        return cublas(lhs, rhs);
    }
    let Some(strategy) = strategy(choice) else {
        return Ok(burn_cubecl::kernel::matmul::matmul(
            lhs.clone(),
            rhs,
            None,
            Default::default(),
            lhs.dtype,
        )?);
    };
    let mut dims = ls.clone();
    dims[d - 1] = rs[d - 1];
    let out = output(&lhs, dims, lhs.dtype);
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: lhs.dtype.into(),
        rhs: rhs.dtype.into(),
        out: out.dtype.into(),
    });
    let (lhs_dtype, rhs_dtype) = (lhs.dtype, rhs.dtype);
    launch_ref(
        &strategy,
        &out.client.clone(),
        InputBinding::new(lhs.binding(), lhs_dtype.into()),
        InputBinding::new(rhs.binding(), rhs_dtype.into()),
        out.clone().binding(),
        &mut dtypes,
    )?;
    Ok(out)
}

/// [`MatmulChoice::Cublas`] on the CUDA backend (`kernels::cublas`); refused elsewhere.
fn cublas<R: CubeRuntime>(
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
) -> Result<CubeTensor<R>, MatmulRefusal> {
    #[cfg(feature = "cuda")]
    {
        use cubecl::cuda::CudaRuntime;
        use std::any::Any;
        let (l, r): (Box<dyn Any>, Box<dyn Any>) = (Box::new(lhs), Box::new(rhs));
        if let (Ok(l), Ok(r)) = (
            l.downcast::<CubeTensor<CudaRuntime>>(),
            r.downcast::<CubeTensor<CudaRuntime>>(),
        ) {
            let out: Box<dyn Any> =
                Box::new(super::cublas::matmul(*l, *r).map_err(MatmulRefusal::Cublas)?);
            return Ok(*out
                .downcast::<CubeTensor<R>>()
                .expect("the output of the runtime of the inputs"));
        }
    }
    #[cfg(not(feature = "cuda"))]
    drop((lhs, rhs));
    Err(MatmulRefusal::Cublas(
        "cuBLAS runs on the CUDA backend only".into(),
    ))
}

/// cubek's strategy for `choice`, with the arguments Burn's autotune set gives it; `None` for
/// [`MatmulChoice::Burn`] and [`MatmulChoice::Cublas`].
pub fn strategy(choice: MatmulChoice) -> Option<Strategy> {
    use BlueprintStrategy::Inferred;
    let simple = |multi_rows, tile_matmul| SimpleArgs {
        multi_rows,
        tile_matmul,
    };
    let double = |specialized, tile_matmul| DoubleBufferingArgs {
        specialized,
        tile_matmul,
    };
    let ordered = |tile_matmul| OrderedSelectionArgs {
        partition_k: Some(2),
        row_count: Some(8),
        rows_per_plane: Some(2),
        tile_matmul,
    };
    let (cmma, mma) = (TileMatmulKind::Cmma, TileMatmulKind::Mma);
    Some(match choice {
        MatmulChoice::Burn | MatmulChoice::Cublas => return None,
        MatmulChoice::SimpleCyclicCmma => Strategy::SimpleCyclicCmma(Inferred(simple(false, cmma))),
        MatmulChoice::SimpleCyclicMma => Strategy::SimpleCyclicMma(Inferred(simple(false, mma))),
        MatmulChoice::SimpleCyclicMmaMultiRow => {
            Strategy::SimpleCyclicMma(Inferred(simple(true, mma)))
        }
        MatmulChoice::DoubleCyclicCmma => Strategy::DoubleCyclicCmma(Inferred(double(false, cmma))),
        MatmulChoice::DoubleCyclicMma => Strategy::DoubleCyclicMma(Inferred(double(false, mma))),
        MatmulChoice::DoubleCyclicMmaSpecialized => {
            Strategy::DoubleCyclicMma(Inferred(double(true, mma)))
        }
        MatmulChoice::OrderedDoubleCmma => Strategy::OrderedDoubleCmma(Inferred(ordered(cmma))),
        MatmulChoice::OrderedDoubleMma => Strategy::OrderedDoubleMma(Inferred(ordered(mma))),
        MatmulChoice::SpecializedCyclicMma => Strategy::SpecializedCyclicMma(Inferred(().into())),
        MatmulChoice::SimpleTmaMma => Strategy::SimpleTmaMma(Inferred(simple(false, mma))),
        MatmulChoice::DoubleTmaMma => Strategy::DoubleTmaMma(Inferred(double(false, mma))),
        MatmulChoice::SpecializedTmaMma => Strategy::SpecializedTmaMma(Inferred(().into())),
        MatmulChoice::SimpleUnit => Strategy::SimpleUnit(Inferred(SimpleUnitSelectionArgs {
            tile_size: TileSizeSelection::MaxTileSize,
        })),
        MatmulChoice::DoubleUnit => Strategy::DoubleUnit(Inferred(DoubleUnitSelectionArgs {
            tile_size: TileSizeSelection::MaxTileSize,
        })),
    })
}
