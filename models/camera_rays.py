"""Camera poses and intrinsics -> per-pixel ray maps -> the tokens of a camera-controlled Wan DiT.

LingBot-World conditions every DiT block on the camera through a ray map (the fixture set's
lingbot.md, "Kind lingbot_camera_embed"): per pixel [ray origin (3), ray direction (3)] of
poses made relative frame to frame, folded 8x8 into 384 channels per latent pixel, then
(1, 2, 2) into 1536 features per token. Poses are camera-to-world 4x4 matrices in OpenCV
axes (x right, y down, z forward); intrinsics are (fx, fy, cx, cy) in pixels.

Two ways to make the poses relative, both here:
  * a whole clip (the bidirectional reference): every 4th pixel frame, frame 0 = identity,
    translations divided by the clip's largest framewise translation (skipped when it is 0);
  * a stream of blocks (the causal Fast model): the block's frames relative to the previous
    one, the first anchored on the previous block's last pose, translations divided by a fixed
    world scale (`world_scale_of` the whole trajectory) so that blocks agree on units.

Everything is batched, runs on the device, and reads nothing back to the host, so a block
program can call it inside a captured graph. `check_poses` / `check_intrinsics` are the
host-side validation of user input (they do read values; call them before a block).
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

FOLD = 8  # the ray map's space-to-channel fold; the checkpoint's input width hard-codes 6*8*8*prod(patch)
RAY_CHANNELS = 6
VAE_TIME = 4  # pixel frames per latent frame


def se3_inverse(pose: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] rigid transforms -> their inverses [R^T, -R^T t; 0 0 0 1]."""
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    trans = -(rot_t @ pose[..., :3, 3:])
    # Built from *_like ops (no in-place write of a Python scalar: traced, that becomes a lifted constant).
    bottom = torch.cat([torch.zeros_like(pose[..., 3:, :3]), torch.ones_like(pose[..., 3:, 3:])], dim=-1)
    return torch.cat([torch.cat([rot_t, trans], dim=-1), bottom], dim=-2)


def rescale_intrinsics(intrinsics: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """(fx, fy, cx, cy) [..., 4] given at `from_hw` pixels -> the same camera at `to_hw` (no crop)."""
    (h0, w0), (h, w) = from_hw, to_hw
    scale = torch.tensor([w / w0, h / h0, w / w0, h / h0], dtype=intrinsics.dtype, device=intrinsics.device)
    return intrinsics * scale


def latent_pose_frames(num_pixel_frames: int) -> list[int]:
    """The pixel frames a clip's latent frames take their pose from: 0, 4, 8, ... of the usable 4m+1."""
    if num_pixel_frames < 1:
        raise InvalidArgumentError(f"camera: need at least one pose, got {num_pixel_frames}")
    usable = VAE_TIME * ((num_pixel_frames - 1) // VAE_TIME) + 1
    return list(range(0, usable, VAE_TIME))


def latent_poses(c2ws: torch.Tensor) -> torch.Tensor:
    """The poses [..., f, 4, 4] of `latent_pose_frames` from per-pixel-frame poses [..., N, 4, 4] (a strided view)."""
    usable = VAE_TIME * ((c2ws.shape[-3] - 1) // VAE_TIME) + 1
    return c2ws[..., 0:usable:VAE_TIME, :, :]


def clip_relative_poses(c2ws: torch.Tensor) -> torch.Tensor:
    """Poses [..., f, 4, 4] of one clip -> framewise relative poses, translations normalised by the clip.

    P_0 = I, P_k = C_{k-1}^{-1} C_k (the same as A_{k-1}^{-1} A_k with A_k = C_0^{-1} C_k); every
    translation divided by the largest one (no division when all are 0: a pure rotation).
    """
    rel = framewise_relative(c2ws, anchor=None)
    return divide_translations(rel, max_translation(rel))


def framewise_relative(c2ws: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
    """[..., f, 4, 4] -> P_k = C_{k-1}^{-1} C_k with C_{-1} = `anchor` [..., 4, 4] (None: C_0, so P_0 = I)."""
    first = c2ws[..., :1, :, :] if anchor is None else anchor.unsqueeze(-3)
    prev = torch.cat([first, c2ws[..., :-1, :, :]], dim=-3)
    rel = se3_inverse(prev) @ c2ws
    if anchor is None:
        # Exactly the identity, as the reference writes it (not C_0^{-1} C_0 up to rounding).
        eye = torch.eye(4, dtype=rel.dtype, device=rel.device).expand_as(rel[..., :1, :, :])
        rel = torch.cat([eye, rel[..., 1:, :, :]], dim=-3)
    return rel


def max_translation(rel: torch.Tensor) -> torch.Tensor:
    """The largest translation norm over the frames of [..., f, 4, 4] -> [...]."""
    return rel[..., :3, 3].norm(dim=-1).amax(dim=-1)


def divide_translations(rel: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Translations of [..., f, 4, 4] divided by `scale` [...]; a scale <= 0 leaves them as they are."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    t = rel[..., :3, 3:] / scale[..., None, None, None]
    return torch.cat([torch.cat([rel[..., :3, :3], t], dim=-1), rel[..., 3:, :]], dim=-2)


def world_scale_of(c2ws: torch.Tensor) -> torch.Tensor:
    """The fixed translation scale of a whole trajectory [..., N, 4, 4] of pixel-frame poses: the largest
    framewise translation between the poses the model sees (pixel frames 0, 4, 8, ...). [...] float."""
    return max_translation(framewise_relative(latent_poses(c2ws), anchor=None))


def ray_map(rel: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Relative poses [B, f, 4, 4] and intrinsics [B, 4] -> rays [B, f, H, W, 6] = [origin, unit direction].

    Pixel centres at +0.5; the direction is R [(u+0.5-cx)/fx, (v+0.5-cy)/fy, 1] / norm, the origin
    the pose's translation (the same for every pixel of a frame).
    """
    dt, dev = rel.dtype, rel.device
    fx, fy, cx, cy = (intrinsics[:, i, None, None] for i in range(4))  # [B, 1, 1]
    v = torch.arange(height, dtype=dt, device=dev)[:, None] + 0.5
    u = torch.arange(width, dtype=dt, device=dev)[None, :] + 0.5
    x = ((u - cx) / fx).expand(-1, height, width)
    y = ((v - cy) / fy).expand(-1, height, width)
    d = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [B, H, W, 3]
    d = d / d.norm(dim=-1, keepdim=True)
    rays_d = torch.einsum("bfij,bhwj->bfhwi", rel[..., :3, :3], d)
    rays_o = rel[:, :, None, None, :3, 3].expand_as(rays_d)
    return torch.cat([rays_o, rays_d], dim=-1)


def fold_rays(rays: torch.Tensor) -> torch.Tensor:
    """[B, f, H, W, 6] -> [B, 384, f, H/8, W/8]: channel c*64 + i*8 + j holds pixel (8y+i, 8x+j), channel c."""
    b, f, h, w, c = rays.shape
    if h % FOLD or w % FOLD:
        raise InvalidArgumentError(f"camera: the ray map {h}x{w} must be a multiple of {FOLD} in both sides")
    x = rays.reshape(b, f, h // FOLD, FOLD, w // FOLD, FOLD, c)  # b f y i x j c
    return x.permute(0, 6, 3, 5, 1, 2, 4).reshape(b, c * FOLD * FOLD, f, h // FOLD, w // FOLD)


def patch_tokens(emb: torch.Tensor, patch: tuple[int, int, int] = (1, 2, 2)) -> torch.Tensor:
    """[B, C, f, h, w] -> [B, L, C*pt*ph*pw] in the video tokens' (f, h, w) order, feature c*4 + p*2 + q."""
    b, c, f, h, w = emb.shape
    pt, ph, pw = patch
    x = emb.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)  # b c F p1 H p2 W p3
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def camera_tokens(
    rel: torch.Tensor,
    intrinsics: torch.Tensor,
    latent_hw: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    patch: tuple[int, int, int] = (1, 2, 2),
) -> torch.Tensor:
    """Relative poses [B, f, 4, 4], intrinsics [B, 4] at 8x the latent size -> tokens [B, L, 1536].

    The ray map is cast to `dtype` (the model's compute dtype) before folding, as the Fast
    pipeline does; the fold itself only moves values.
    """
    h, w = latent_hw[0] * FOLD, latent_hw[1] * FOLD
    return patch_tokens(fold_rays(ray_map(rel, intrinsics, h, w).to(dtype)), patch)


def stream_pose_frames(first: bool, frames_per_block: int) -> list[int]:
    """Which of a block's 4*nf pixel-frame poses its latent frames use.

    Block 0 (the start image's frame, then 4 per latent): 0, 4, 8, ...; later blocks (4 pixel
    frames per latent, the last of each group): 3, 7, 11, ... Globally latent frame k is pixel frame 4k.
    """
    start = 0 if first else VAE_TIME - 1
    return [start + VAE_TIME * i for i in range(frames_per_block)]


def stream_relative_poses(
    poses: torch.Tensor, anchor: torch.Tensor, world_scale: torch.Tensor, first: bool, frames_per_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of the causal stream: (relative poses [B, nf, 4, 4], the block's last used pose [B, 4, 4]).

    poses [B, 4*nf, 4, 4] (the block's pixel frames); anchor [B, 4, 4] the previous block's last used
    pose (ignored for block 0, whose first pose is the identity); world_scale [B] (<= 0: no division).
    """
    start = 0 if first else VAE_TIME - 1
    # A strided slice, not an index list: no host-to-device copy inside a captured block.
    used = poses[:, start : start + VAE_TIME * frames_per_block : VAE_TIME]
    rel = framewise_relative(used, None if first else anchor)
    return divide_translations(rel, world_scale), used[:, -1]


# -- host-side validation of user input ----------------------------------------------------------


def check_poses(poses: torch.Tensor, name: str = "poses", tol: float = 1e-3) -> None:
    """Refuse anything that is not a batch of rigid camera-to-world transforms [..., 4, 4].

    Finite; the rotation block orthonormal with determinant +1 within `tol`; bottom row
    [0, 0, 0, 1] within `tol`. Raises InvalidArgumentError naming the first bad pose.
    """
    if not isinstance(poses, torch.Tensor) or poses.dim() < 2 or tuple(poses.shape[-2:]) != (4, 4):
        got = tuple(poses.shape) if isinstance(poses, torch.Tensor) else type(poses).__name__
        raise InvalidArgumentError(f"{name}: camera-to-world poses must be [..., 4, 4] matrices; got {got}")
    p = poses.detach().to("cpu", torch.float64).reshape(-1, 4, 4)
    if not bool(torch.isfinite(p).all()):
        raise InvalidArgumentError(f"{name}: poses hold non-finite values (NaN or inf)")
    rot = p[:, :3, :3]
    ortho = (rot.transpose(1, 2) @ rot - torch.eye(3, dtype=p.dtype)).abs().amax(dim=(1, 2))
    det = torch.linalg.det(rot)
    bottom = (p[:, 3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=p.dtype)).abs().amax(dim=1)
    bad = (ortho > tol) | ((det - 1).abs() > tol) | (bottom > tol)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise InvalidArgumentError(
            f"{name}: pose {i} (flattened) is not a rigid transform: |R^T R - I| = {float(ortho[i]):.2e}, "
            f"det R = {float(det[i]):.4f}, bottom row {p[i, 3].tolist()} (tolerance {tol}); "
            "poses are camera-to-world 4x4 matrices [R t; 0 0 0 1] with R a proper rotation"
        )


def check_intrinsics(intrinsics: torch.Tensor, name: str = "intrinsics") -> None:
    """Refuse intrinsics [..., 4] = (fx, fy, cx, cy) that are not finite or whose focal lengths are not > 0."""
    if not isinstance(intrinsics, torch.Tensor) or intrinsics.dim() < 1 or intrinsics.shape[-1] != 4:
        got = tuple(intrinsics.shape) if isinstance(intrinsics, torch.Tensor) else type(intrinsics).__name__
        raise InvalidArgumentError(f"{name}: intrinsics must be [..., 4] = (fx, fy, cx, cy); got {got}")
    k = intrinsics.detach().to("cpu", torch.float64).reshape(-1, 4)
    if not bool(torch.isfinite(k).all()):
        raise InvalidArgumentError(f"{name}: intrinsics hold non-finite values (NaN or inf)")
    if not bool((k[:, :2] > 0).all()):
        raise InvalidArgumentError(f"{name}: focal lengths fx, fy must be > 0; got {k[:, :2].tolist()}")
