/*
 * moe_fused.h - the whole public C ABI of libmoe_fused.
 *
 * A Mixture-of-Experts (MoE) experts layer and its primitive, with a CPU
 * implementation (always built; the reference every GPU kernel is tested
 * against) and a CUDA implementation (built when nvcc is found).
 *
 * Conventions (see shared/DESIGN.md):
 *   - Every entry point returns a moe_status_t. It never exits, aborts or
 *     prints. On failure, moe_last_error() returns a message for the calling
 *     thread that names the offending argument.
 *   - All arguments are validated before anything is written or launched.
 *   - Tensors are plain descriptors: data pointer, dtype, shape, strides in
 *     elements. No ownership is transferred.
 *   - Compute calls neither allocate, synchronise with the host nor print.
 *     Scratch memory comes from the caller (moe_context_t.workspace) and its
 *     size from the matching *_workspace_size query.
 *   - CUDA work is enqueued on moe_context_t.stream (the caller's stream) and
 *     is safe under CUDA graph capture.
 *
 * Math (token t, slot j, expert e = top_k_index[t,j], s = top_k_weights[t,j]):
 *   h   = gate_up_proj[e] x_t          gate_up_proj [E, 2I, H]; h = [g ; u]
 *   a   = silu(g) * u
 *   y   = down_proj[e] a               down_proj [E, H, I]
 *   out_t = sum_j s * y
 */
#ifndef MOE_FUSED_H
#define MOE_FUSED_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MOE_API __declspec(dllexport)
#else
#define MOE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change; the Python loader refuses a mismatch. */
#define MOE_ABI_VERSION 3

/* Status codes. The Python layer maps each to an exception class (named). */
typedef enum {
  MOE_OK = 0,
  MOE_ERR_SHAPE = 1,       /* wrong rank or size (ValueError)            */
  MOE_ERR_DTYPE = 2,       /* unsupported or mismatched dtype (TypeError) */
  MOE_ERR_INDEX = 3,       /* an expert index outside [0, E) (IndexError) */
  MOE_ERR_DEVICE = 4,      /* tensor on the wrong device (ValueError)     */
  MOE_ERR_STRIDE = 5,      /* a layout the implementation refuses (ValueError) */
  MOE_ERR_NULL = 6,        /* a required pointer is NULL (ValueError)     */
  MOE_ERR_WORKSPACE = 7,   /* workspace missing or too small (ValueError) */
  MOE_ERR_UNSUPPORTED = 8, /* e.g. CUDA requested but not built (RuntimeError) */
  MOE_ERR_CUDA = 9,        /* a CUDA runtime error (RuntimeError)         */
  MOE_ERR_INTERNAL = 10    /* a bug in moe-fused (RuntimeError)           */
} moe_status_t;

typedef enum {
  MOE_DTYPE_F32 = 0,
  MOE_DTYPE_F16 = 1,
  MOE_DTYPE_BF16 = 2,
  MOE_DTYPE_F64 = 3, /* CPU only: lets gradcheck run in double precision */
  MOE_DTYPE_I32 = 4,
  MOE_DTYPE_I64 = 5
} moe_dtype_t;

typedef enum { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 } moe_device_t;

#define MOE_MAX_DIMS 4

/* A strided view of memory. A tensor argument that is "optional" may be
 * passed as a NULL pointer to the descriptor; then nothing is computed for it.
 * `name`, when not NULL, is used in error messages instead of the parameter's
 * own name (so a Python caller's messages name the Python argument). */
typedef struct {
  void *data;
  int32_t dtype; /* moe_dtype_t */
  int32_t ndim;  /* 1 .. MOE_MAX_DIMS */
  int64_t shape[MOE_MAX_DIMS];
  int64_t strides[MOE_MAX_DIMS]; /* in elements, not bytes */
  const char *name;
} moe_tensor_t;

/* Where and how a call runs. */
typedef struct {
  int32_t device_type;  /* moe_device_t */
  int32_t device_index; /* CUDA ordinal; ignored on the CPU */
  void *stream;         /* cudaStream_t; NULL = legacy default stream */
  void *workspace;      /* caller scratch on the same device, 256-byte aligned */
  size_t workspace_bytes;
  uint64_t flags; /* MOE_FLAG_* below, OR-ed */
} moe_context_t;

/* Use the portable (mma.sync) CUDA kernels even where an arch-specific path
 * exists. Equivalent to the environment variable MOE_FUSED_PORTABLE=1. */
#define MOE_FLAG_FORCE_PORTABLE (1ull << 0)

/* moe_experts_backward may overwrite h, which it reads once and needs no more: the
 * CUDA path writes dh over it instead of into the workspace (T*k*2I elements less;
 * ask moe_experts_backward_workspace_size with this flag). h holds no defined values
 * afterwards, so a caller that runs the backward twice on one h must not pass it. */
#define MOE_FLAG_OVERWRITE_H (1ull << 1)

/* The CUDA experts layer produces GEMM2's and dX's per-pair rows (T*k rows of H) all at
 * once instead of in token windows each no larger than the [T*k, I] buffers beside them:
 * T*k*H elements more workspace at most (ask the *_workspace_size queries with this flag),
 * less time where windows are taken (T*k >= 2 * 256 * num_experts and H > I; measured on
 * the H100, Qwen3-30B-A3B T=16384: 0.16 ms of GEMM2). Results are bit-identical. */
#define MOE_FLAG_ONE_WINDOW (1ull << 2)

/* For moe_experts_forward_workspace_size: the forward will be called with h = NULL (no
 * backward follows). Only the CUDA float32 path needs more then: it keeps h in the
 * workspace (T*k*2I floats). moe_experts_forward itself adds the flag when h is NULL, so a
 * workspace sized without it is refused there (MOE_ERR_WORKSPACE), never overrun. */
#define MOE_FLAG_FORWARD_NO_H (1ull << 3)

/* Launch the CUDA kernels without programmatic dependent launch: each kernel is scheduled
 * only once the previous one on the stream has finished. By default (sm90 and later) a
 * kernel may be scheduled during the previous one's last wave and set itself up there,
 * waiting for its inputs in the kernel; results are the same either way. Equivalent to
 * the environment variable MOE_FUSED_PDL=0. */
#define MOE_FLAG_NO_PDL (1ull << 4)

/* The routing plan: the T*k (token, slot) pairs sorted by expert.
 * A pair is identified by p = t*k + j. Within one expert, pairs keep
 * ascending p (stable), so every result is deterministic.
 *   expert_offsets [E+1] int32: rows of expert e are [offsets[e], offsets[e+1])
 *   sorted_pairs   [T*k] int32: sorted_pairs[r] = p of sorted row r
 *   pair_rows      [T*k] int32: the inverse: pair_rows[p] = r
 * All three are contiguous int32 on the call's device. */
typedef struct {
  moe_tensor_t expert_offsets;
  moe_tensor_t sorted_pairs;
  moe_tensor_t pair_rows;
} moe_plan_t;

/* ---- library ---------------------------------------------------------- */

MOE_API int32_t moe_abi_version(void);
/* Message of the last failing call on this thread ("" if none). */
MOE_API const char *moe_last_error(void);
/* 1 if this build contains the CUDA implementation, else 0. */
MOE_API int32_t moe_has_cuda(void);

/* ---- routing plan ----------------------------------------------------- */

/* top_k_index [T,k] int32 or int64, values in [0, num_experts). */
MOE_API size_t moe_routing_plan_workspace_size(int32_t device_type,
                                               int64_t num_pairs,
                                               int64_t num_experts);
MOE_API moe_status_t moe_routing_plan(const moe_context_t *ctx,
                                      const moe_tensor_t *top_k_index,
                                      int64_t num_experts,
                                      const moe_plan_t *plan);

/* ---- moe_fused_linear --------------------------------------------------
 * out[b,o] = sum_i weight[sel[b], o, i] * input[b, i]
 *   input [N,in], weight [E,out,in], selected_experts [N] int32/int64,
 *   out [N,out]; input, weight and out share one float dtype. */
MOE_API size_t moe_linear_workspace_size(int32_t device_type, int64_t n,
                                         int64_t num_experts,
                                         int64_t in_features,
                                         int64_t out_features);
MOE_API moe_status_t moe_linear_forward(const moe_context_t *ctx,
                                        const moe_tensor_t *input,
                                        const moe_tensor_t *weight,
                                        const moe_tensor_t *selected_experts,
                                        const moe_tensor_t *out);
/* grad_input [N,in] and grad_weight [E,out,in] are optional (NULL = skip);
 * both are overwritten, not accumulated into. */
MOE_API moe_status_t moe_linear_backward(const moe_context_t *ctx,
                                         const moe_tensor_t *grad_out,
                                         const moe_tensor_t *input,
                                         const moe_tensor_t *weight,
                                         const moe_tensor_t *selected_experts,
                                         const moe_tensor_t *grad_input,
                                         const moe_tensor_t *grad_weight);

/* ---- fused experts layer -----------------------------------------------
 *   hidden_states [T,H], top_k_index [T,k] int32/int64,
 *   top_k_weights [T,k] (the activation dtype or float32),
 *   gate_up_proj [E,2I,H], down_proj [E,H,I] (the activation dtype).
 * Forward writes the plan, h [T*k, 2I] (activation dtype, rows in plan
 * order: row r belongs to pair sorted_pairs[r]) and out [T,H].
 * h is optional in the forward: NULL means "no backward will follow" (no-grad
 * calls: inference, evaluation), and h is not stored. out is then
 * bit-identical to the call with h, whose a = silu(g) * u is computed from
 * the h rounded to the activation dtype either way. The workspace queries do
 * not change with it, except on the CUDA float32 path (a slow exact-fp32
 * path), whose forward keeps h in the workspace then: ask its forward query
 * with MOE_FLAG_FORWARD_NO_H (the combined query already counts it).
 * The backward needs only hidden_states, top_k_weights, the weights, the plan
 * and h (required there); it recomputes a and y. Every gradient is optional (NULL = skip) and
 * overwritten: grad_hidden_states [T,H], grad_top_k_weights [T,k],
 * grad_gate_up_proj [E,2I,H], grad_down_proj [E,H,I]. */
/* Workspace bytes enough for either call, every gradient, any flags. */
MOE_API size_t moe_experts_workspace_size(int32_t device_type, int64_t T,
                                          int64_t k, int64_t H, int64_t I,
                                          int64_t num_experts);
/* The bytes each call needs, for activations of dtype `dtype` (moe_dtype_t; -1: any)
 * under ctx flags `flags`: the forward's, and the backward's for the gradients it is
 * asked for (MOE_GRAD_* bits, OR-ed). A backward that asks for more gradients than
 * `grads`, or runs without a flag that `flags` had, may need more (it checks).
 * The CUDA backward uses a contiguous grad_gate_up_proj as scratch before it writes
 * it (s*a and dx's per-pair rows live there), so its workspace is smaller with
 * MOE_GRAD_GATE_UP_PROJ; a strided grad_gate_up_proj needs the size without the bit. */
#define MOE_GRAD_HIDDEN_STATES (1u << 0)
#define MOE_GRAD_TOP_K_WEIGHTS (1u << 1)
#define MOE_GRAD_GATE_UP_PROJ (1u << 2)
#define MOE_GRAD_DOWN_PROJ (1u << 3)
MOE_API size_t moe_experts_forward_workspace_size(int32_t device_type, int32_t dtype,
                                                  int64_t T, int64_t k, int64_t H,
                                                  int64_t I, int64_t num_experts,
                                                  uint64_t flags);
MOE_API size_t moe_experts_backward_workspace_size(int32_t device_type, int32_t dtype,
                                                   int64_t T, int64_t k, int64_t H,
                                                   int64_t I, int64_t num_experts,
                                                   uint32_t grads, uint64_t flags);
MOE_API moe_status_t moe_experts_forward(const moe_context_t *ctx,
                                         const moe_tensor_t *hidden_states,
                                         const moe_tensor_t *top_k_index,
                                         const moe_tensor_t *top_k_weights,
                                         const moe_tensor_t *gate_up_proj,
                                         const moe_tensor_t *down_proj,
                                         const moe_plan_t *plan,
                                         const moe_tensor_t *h,
                                         const moe_tensor_t *out);
MOE_API moe_status_t moe_experts_backward(
    const moe_context_t *ctx, const moe_tensor_t *grad_out,
    const moe_tensor_t *hidden_states, const moe_tensor_t *top_k_weights,
    const moe_tensor_t *gate_up_proj, const moe_tensor_t *down_proj,
    const moe_plan_t *plan, const moe_tensor_t *h,
    const moe_tensor_t *grad_hidden_states,
    const moe_tensor_t *grad_top_k_weights,
    const moe_tensor_t *grad_gate_up_proj, const moe_tensor_t *grad_down_proj);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOE_FUSED_H */
