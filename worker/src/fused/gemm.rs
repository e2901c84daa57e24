//! A row-major batched matmul as cuBLAS's column-major strided-batched GEMM: which operand is
//! transposed, the leading dimensions and batch strides (`fused::kernels::cublas` launches it).
//! Pure arithmetic on shapes and strides, so it is tested on the CPU against the GEMM's
//! definition (cuBLAS documentation, `cublasGemmStridedBatchedEx`).
//!
//! cuBLAS reads matrices column-major; a row-major `C [m, n]` is a column-major `n x m` matrix
//! `C^T`, and `C^T = B^T A^T`. So cuBLAS's first operand is dapt's right-hand side and its
//! second dapt's left-hand side: a row-major operand (last stride 1) is, read column-major,
//! already the transpose it needs (`CUBLAS_OP_N`, leading dimension its row stride); a
//! transposed view (second-to-last stride 1) is read column-major as itself, so cuBLAS
//! transposes it (`CUBLAS_OP_T`, leading dimension its column stride).

/// cuBLAS's arguments for `lhs [.., m, k] @ rhs [.., k, n]` into a new contiguous
/// `[.., m, n]`: `C^T (n x m) = op(A) op(B)` with `A` = dapt's `rhs`, `B` = dapt's `lhs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnMajorGemm {
    /// `CUBLAS_OP_T` for `A` (dapt's `rhs` a transposed view), else `CUBLAS_OP_N`.
    pub trans_a: bool,
    /// `CUBLAS_OP_T` for `B` (dapt's `lhs` a transposed view), else `CUBLAS_OP_N`.
    pub trans_b: bool,
    /// cuBLAS's `m`: dapt's `n`.
    pub m: usize,
    /// cuBLAS's `n`: dapt's `m`.
    pub n: usize,
    pub k: usize,
    /// Leading dimensions, in elements.
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// Elements from one batch's matrix to the next (0 when `batch` is 1).
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    /// The batch dimensions' product.
    pub batch: usize,
}

/// The GEMM for `lhs [.., m, k] @ rhs [.., k, n]` with these shapes and strides (in
/// elements), or `None` when cuBLAS cannot read an operand in place: equal ranks of at least 2,
/// equal batch dimensions and inner sizes are required, each matrix must be row-major or a
/// transposed view (one of its last two strides 1), its batch dimensions must collapse into
/// one stride, and every size must fit cuBLAS's 32-bit arguments.
pub fn column_major_gemm(
    lhs_shape: &[usize],
    lhs_strides: &[usize],
    rhs_shape: &[usize],
    rhs_strides: &[usize],
) -> Option<ColumnMajorGemm> {
    let d = lhs_shape.len();
    if d < 2
        || rhs_shape.len() != d
        || lhs_strides.len() != d
        || rhs_strides.len() != d
        || lhs_shape[..d - 2] != rhs_shape[..d - 2]
        || lhs_shape[d - 1] != rhs_shape[d - 2]
    {
        return None;
    }
    let (m, k, n) = (lhs_shape[d - 2], lhs_shape[d - 1], rhs_shape[d - 1]);
    if m == 0 || k == 0 || n == 0 {
        return None;
    }
    let (trans_a, lda) = matrix(k, n, rhs_strides[d - 2], rhs_strides[d - 1])?;
    let (trans_b, ldb) = matrix(m, k, lhs_strides[d - 2], lhs_strides[d - 1])?;
    let batch: usize = lhs_shape[..d - 2].iter().product();
    let (stride_a, stride_b) = if batch > 1 {
        (
            batch_stride(&rhs_shape[..d - 2], &rhs_strides[..d - 2])?,
            batch_stride(&lhs_shape[..d - 2], &lhs_strides[..d - 2])?,
        )
    } else {
        (0, 0)
    };
    let stride_c = if batch > 1 { m * n } else { 0 };
    let fits = |x: usize| i32::try_from(x).is_ok();
    let all = [m, n, k, lda, ldb, batch];
    if !all.into_iter().all(fits) {
        return None;
    }
    Some(ColumnMajorGemm {
        trans_a,
        trans_b,
        m: n,
        n: m,
        k,
        lda,
        ldb,
        ldc: n,
        stride_a,
        stride_b,
        stride_c,
        batch,
    })
}

/// How cuBLAS reads a row-major `rows x cols` matrix with strides `(s0, s1)`: `(transposed,
/// leading dimension)`, or `None` if neither stride is 1 (or the leading dimension is short).
fn matrix(rows: usize, cols: usize, s0: usize, s1: usize) -> Option<(bool, usize)> {
    // A single row or column has a meaningless stride along its length-1 side.
    let s1 = if cols == 1 { 1 } else { s1 };
    let s0 = if rows == 1 { cols.max(s0) } else { s0 };
    if s1 == 1 && s0 >= cols {
        Some((false, s0.max(1)))
    } else if s0 == 1 && s1 >= rows {
        Some((true, s1.max(1)))
    } else {
        None
    }
}

/// One stride for batch dimensions `shape` with `strides` (`None` unless every dimension of
/// more than one element steps by the next one's stride times its size).
fn batch_stride(shape: &[usize], strides: &[usize]) -> Option<usize> {
    let dims: Vec<(usize, usize)> = shape
        .iter()
        .zip(strides)
        .filter(|(size, _)| **size > 1)
        .map(|(size, stride)| (*size, *stride))
        .collect();
    let (_, innermost) = *dims.last()?;
    dims.windows(2)
        .all(|w| w[0].1 == w[1].1 * w[1].0)
        .then_some(innermost)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's definition: `C[i + j ldc + b stride_c] = sum_l op(A)[i, l] op(B)[l, j]`,
    /// column-major, `op(X)[r, c] = X[r + c ld]` or, transposed, `X[c + r ld]`.
    fn gemm(g: &ColumnMajorGemm, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; g.batch.max(1) * g.m * g.n];
        for bt in 0..g.batch.max(1) {
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut sum = 0.0;
                    for l in 0..g.k {
                        let av = if g.trans_a {
                            a[bt * g.stride_a + l + i * g.lda]
                        } else {
                            a[bt * g.stride_a + i + l * g.lda]
                        };
                        let bv = if g.trans_b {
                            b[bt * g.stride_b + j + l * g.ldb]
                        } else {
                            b[bt * g.stride_b + l + j * g.ldb]
                        };
                        sum += av * bv;
                    }
                    c[bt * g.stride_c + i + j * g.ldc] = sum;
                }
            }
        }
        c
    }

    /// A strided row-major operand: its buffer (of `len` elements, values distinct) and how
    /// to read element `(batch, r, c)`.
    struct Operand {
        buf: Vec<f64>,
        shape: Vec<usize>,
        strides: Vec<usize>,
    }

    impl Operand {
        fn new(shape: Vec<usize>, strides: Vec<usize>, seed: f64) -> Operand {
            let len = shape
                .iter()
                .zip(&strides)
                .map(|(s, st)| (s - 1) * st)
                .sum::<usize>()
                + 1;
            let buf = (0..len).map(|i| ((i as f64 + seed) * 0.37).sin()).collect();
            Operand {
                buf,
                shape,
                strides,
            }
        }

        fn at(&self, batch: usize, r: usize, c: usize) -> f64 {
            let d = self.shape.len();
            // The batch index over the batch dimensions, row-major.
            let mut rest = batch;
            let mut off = 0;
            for i in (0..d - 2).rev() {
                off += (rest % self.shape[i]) * self.strides[i];
                rest /= self.shape[i];
            }
            self.buf[off + r * self.strides[d - 2] + c * self.strides[d - 1]]
        }
    }

    fn check(lhs: Operand, rhs: Operand) {
        let g = column_major_gemm(&lhs.shape, &lhs.strides, &rhs.shape, &rhs.strides)
            .unwrap_or_else(|| panic!("no GEMM for {:?} @ {:?}", lhs.strides, rhs.strides));
        let d = lhs.shape.len();
        let (m, k, n) = (lhs.shape[d - 2], lhs.shape[d - 1], rhs.shape[d - 1]);
        let c = gemm(&g, &rhs.buf, &lhs.buf);
        for bt in 0..g.batch {
            for r in 0..m {
                for col in 0..n {
                    let want: f64 = (0..k).map(|l| lhs.at(bt, r, l) * rhs.at(bt, l, col)).sum();
                    // C row-major contiguous [batch, m, n].
                    let got = c[bt * m * n + r * n + col];
                    assert!((want - got).abs() < 1e-9, "{g:?} at {bt},{r},{col}");
                }
            }
        }
    }

    #[test]
    fn every_layout_the_model_uses_is_the_gemm_of_its_matmul() {
        let (m, k, n) = (5, 7, 3);
        // Plain: both row-major.
        check(
            Operand::new(vec![m, k], vec![k, 1], 0.0),
            Operand::new(vec![k, n], vec![n, 1], 1.0),
        );
        // x W^T: the right side a transposed view of a row-major [n, k].
        check(
            Operand::new(vec![m, k], vec![k, 1], 2.0),
            Operand::new(vec![k, n], vec![1, k], 3.0),
        );
        // dy^T x: the left side a transposed view of a row-major [k, m].
        check(
            Operand::new(vec![m, k], vec![1, m], 4.0),
            Operand::new(vec![k, n], vec![n, 1], 5.0),
        );
        // Both transposed views.
        check(
            Operand::new(vec![m, k], vec![1, m], 6.0),
            Operand::new(vec![k, n], vec![1, k], 7.0),
        );
        // Pitched rows (CUDA pads rows to 512 bytes): leading dimensions beyond the width.
        check(
            Operand::new(vec![m, k], vec![k + 9, 1], 8.0),
            Operand::new(vec![k, n], vec![1, k + 4], 9.0),
        );
        // Batched 4-D, Q K^T as blockwise attention gives it: [2, 3, m, k] @ swap_dims(2, 3)
        // of a contiguous [2, 3, n, k].
        check(
            Operand::new(vec![2, 3, m, k], vec![3 * m * k, m * k, k, 1], 10.0),
            Operand::new(vec![2, 3, k, n], vec![3 * n * k, n * k, 1, k], 11.0),
        );
        // Batched with a size-1 batch dimension and one row.
        check(
            Operand::new(vec![1, 4, 1, k], vec![4 * k, k, k, 1], 12.0),
            Operand::new(vec![1, 4, k, n], vec![4 * k * n, k * n, n, 1], 13.0),
        );
    }

    #[test]
    fn what_cublas_cannot_read_in_place_is_refused() {
        // Neither of the last two strides is 1 (a strided slice of columns).
        assert!(column_major_gemm(&[4, 6], &[12, 2], &[6, 3], &[3, 1]).is_none());
        // Batch dimensions that do not collapse into one stride (a permuted batch).
        assert!(column_major_gemm(
            &[2, 3, 4, 5],
            &[20, 40, 5, 1],
            &[2, 3, 5, 6],
            &[90, 30, 6, 1]
        )
        .is_none());
        // Mismatched inner sizes, ranks or batches.
        assert!(column_major_gemm(&[4, 5], &[5, 1], &[6, 3], &[3, 1]).is_none());
        assert!(column_major_gemm(&[2, 4, 5], &[20, 5, 1], &[3, 5, 3], &[15, 3, 1]).is_none());
        assert!(column_major_gemm(&[4, 5], &[5, 1], &[1, 5, 3], &[15, 3, 1]).is_none());
        // Beyond cuBLAS's 32-bit sizes.
        assert!(column_major_gemm(&[1 << 31, 2], &[2, 1], &[2, 2], &[2, 1]).is_none());
    }
}
