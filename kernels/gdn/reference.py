"""PyTorch references for the gated delta rule (Gated DeltaNet), layout [B, T, H, D].

Convention, kept by every kernel in this folder. Per batch and head, with state S of shape [K, V]
(key x value), gate g_t = log-space decay (<= 0), beta_t in (0, 1):

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T        (1)
    o_t = scale * S_t^T q_t                                                          (2)

S_0 is `initial_state` (zeros when absent); `final_state` is S_T. Shapes: q, k [B, T, H, K];
v [B, T, H, V]; g, beta [B, T, H]; states [B, H, K, V]; output [B, T, H, V]. The default scale is
K ** -0.5. Both forms compute in float32 (float64 when the inputs are float64) and return the output in
the dtype of v, and the final state in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.common import compute_dtype, without_autocast

Tensor = torch.Tensor


@without_autocast
def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Step-by-step recurrence (1)-(2); the ground truth the chunked form is checked against."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dt, out_dtype = compute_dtype(v), v.dtype
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt).clone()
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        decay = g[:, t].exp()[..., None, None]  # [B, H, 1, 1]
        S = S * decay
        kt = k[:, t]  # [B, H, K]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., :, None] * u[..., None, :]
        o[:, t] = scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o.to(out_dtype), (S if output_final_state else None)


@without_autocast
def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked form of (1)-(2): the WY/UT representation inside a chunk, a recurrence across chunks.

    Inside a chunk of C steps let G_i = sum_{j<=i} g_j (cumulative log decay from the chunk start) and
    S_0 the state entering the chunk. Unrolling (1) gives the per-step delta w_j = beta_j (v_j -
    exp(g_j) S_{j-1}^T k_j) as the solution of the unit lower-triangular system

        (I + A) W = diag(beta) V - diag(beta exp(G)) K S_0,
        A_ij = beta_i exp(G_i - G_j) k_i . k_j   for j < i, else 0,                  (3)

    so with T = (I + A)^-1 (one triangular solve): U = T diag(beta) V, W_k = T diag(beta exp G) K,
    W = U - W_k S_0. Then

        O = scale (diag(exp G) Q S_0 + (Q K^T * Gamma) W),  Gamma_ij = exp(G_i - G_j) [j <= i]   (4)
        S_C = exp(G_C) S_0 + (exp(G_C - G) * K)^T W.                                        (5)

    Any T: the tail is padded with k = v = q = 0, g = 0, beta = 0, which leaves the state unchanged.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    dt = compute_dtype(v)
    out_dtype = v.dtype
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    N = (T + pad) // C
    # [B, H, N, C, D] views, computation dtype
    q, k, v = (x.to(dt).reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    g, beta = (x.to(dt).reshape(B, N, C, H).permute(0, 3, 1, 2) for x in (g, beta))

    G = g.cumsum(-1)  # [B, H, N, C]
    lower_strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    lower_incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = G[..., :, None] - G[..., None, :]  # G_i - G_j
    # mask before exp: entries above the diagonal would overflow
    gamma_strict = diff.masked_fill(~lower_strict, float("-inf")).exp()
    gamma_incl = diff.masked_fill(~lower_incl, float("-inf")).exp()

    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * gamma_strict  # (3)
    eye = torch.eye(C, dtype=dt, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], dim=-1)
    UW = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U, Wk = UW[..., :V], UW[..., V:]
    attn = (q @ k.transpose(-1, -2)) * gamma_incl  # Q K^T * Gamma
    q_decayed = G.exp()[..., None] * q
    k_to_end = (G[..., -1:] - G).exp()[..., None] * k  # exp(G_C - G_j) k_j

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    o = torch.empty_like(U)
    for n in range(N):  # the only sequential part: one step per chunk
        W = U[:, :, n] - Wk[:, :, n] @ S
        o[:, :, n] = scale * (q_decayed[:, :, n] @ S + attn[:, :, n] @ W)  # (4)
        S = G[:, :, n, -1, None, None].exp() * S + k_to_end[:, :, n].transpose(-1, -2) @ W  # (5)

    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), (S if output_final_state else None)
