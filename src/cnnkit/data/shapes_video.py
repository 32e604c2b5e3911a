"""Moving ``shapes`` sequences (for tracking): objects drift, spin and leave the frame, the
light changes slowly; every frame is rendered by :func:`cnnkit.data.shapes.render_scene`."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from cnnkit.data.shapes import (
    Scene,
    SceneParams,
    ShapeSpec,
    _sample_objects,
    render_scene,
    sample_background,
    sample_lighting,
)


def _step(o: ShapeSpec, imgsz: int) -> ShapeSpec:
    """Move one frame, bouncing so the circumscribed circle stays inside the image."""
    m = min(o.size, imgsz / 2)
    pos, vel = [o.cx, o.cy], list(o.velocity)
    for i in range(2):
        pos[i] += vel[i]
        if not m <= pos[i] <= imgsz - m:
            pos[i] = 2 * (m if pos[i] < m else imgsz - m) - pos[i]
            vel[i] = -vel[i]
        pos[i] = min(max(pos[i], m), imgsz - m)
    return replace(o, cx=pos[0], cy=pos[1], velocity=(vel[0], vel[1]),
                   angle=(o.angle + o.spin) % 360)


def sample_sequence(params: SceneParams, rng: np.random.Generator, num_frames: int,
                    speed: float = 2.0) -> list[Scene]:
    """Sample a video of moving shapes for tracking.

    Each object moves at ``speed * U(0.5, 1.5)`` px/frame in a random direction, spins up to
    5 deg/frame (if ``params.rotation``) and bounces off the borders (its circumscribed circle
    stays inside). Background, clutter and occluders (sampled on frame 0, so ``max_occlusion``
    only holds there) stay fixed; lighting drifts slowly; noise is new every frame.
    ``ShapeSpec.velocity`` in frame t is the step to frame t+1 (flipped on a bounce) and
    ``track_id`` is constant. Moving objects may overlap even with ``allow_overlap=False``.

    Args:
        params: Generator settings.
        rng: Source of all randomness.
        num_frames: Number of frames.
        speed: Mean speed in px/frame.

    Returns:
        ``num_frames`` scenes.
    """
    bg = sample_background(params, rng)
    objects = []
    for o in _sample_objects(params, rng, bg):
        a, v = rng.uniform(0, 2 * math.pi), speed * rng.uniform(0.5, 1.5)
        spin = float(rng.uniform(-5, 5)) if params.rotation else 0.0
        objects.append(replace(o, velocity=(v * math.cos(a), v * math.sin(a)), spin=spin))
    light, occluders, frames = sample_lighting(params, rng), None, []
    for _ in range(num_frames):
        frames.append(render_scene(objects, params, rng, background=bg, occluders=occluders,
                                   lighting=light))
        occluders = frames[-1].occluders
        objects = [_step(o, params.imgsz) for o in objects]
        if params.lighting > 0:
            d = params.lighting * rng.normal(0, 1, 4)
            light = replace(light, gain=float(np.clip(light.gain + 0.004 * d[0], 0.5, 1.5)),
                            offset=float(np.clip(light.offset + 0.8 * d[1], -60, 60)),
                            gx=light.gx + 0.004 * d[2], gy=light.gy + 0.004 * d[3])
    return frames
