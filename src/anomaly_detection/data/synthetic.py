# src/anomaly_detection/data/synthetic.py
import io
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from anomaly_detection.utils import atomic_write_bytes

SYNTHETIC_KINDS = ("texture", "object")
DEFECT_TYPES = {
    "texture": ("scratch", "hole", "stain"),
    "object": ("scratch", "missing_part", "stain"),
}

# Bump when the rendering changes so that cached folders are recognised as stale.
GENERATOR_VERSION = 1
MARKER_NAME = "synthetic.json"
# Below 32 px a defect is a handful of pixels and the object's hole and stamp blur together.
MIN_IMAGE_SIDE = 32
_SIZE_REASON = f" (below {MIN_IMAGE_SIDE} pixels per side a defect covers only a few pixels)"
# a covariance (Gaussian models) needs two images, and the validation split is carved out of the training images.
MIN_TRAIN_IMAGES = 2
# A defect must cover at least this fraction of the image to be findable at 32-64 px.
MIN_DEFECT_FRACTION = 0.01
# Mean absolute change (0-1 scale) a defect must cause inside its mask.
MIN_DEFECT_CONTRAST = 0.08
_SPLIT_TRAIN = 0
_SPLIT_TEST_GOOD = 1
_SPLIT_TEST_DEFECT = 2

logger = logging.getLogger("anomaly_detection")


def _check_int(name, value, minimum, why=""):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}{why}")
    return int(value)


def _normalize_size(image_size):
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or a (height, width) pair, got {image_size!r}")
        return (_check_int("image_size", image_size[0], MIN_IMAGE_SIDE, _SIZE_REASON),
                _check_int("image_size", image_size[1], MIN_IMAGE_SIDE, _SIZE_REASON))
    side = _check_int("image_size", image_size, MIN_IMAGE_SIDE, _SIZE_REASON)
    return side, side


def _check_kind(kind):
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(SYNTHETIC_KINDS)}")
    return kind


def _check_defect(kind, defect):
    if defect is not None and defect not in DEFECT_TYPES[kind]:
        raise ValueError(f"unknown defect {defect!r} for kind {kind!r}: expected one of "
                         f"{', '.join(DEFECT_TYPES[kind])}")
    return defect


def _pixel_grid(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _smooth_field(rng, h, w, cells, amplitude):
    # Separable Gaussian-RBF interpolation of a coarse random grid: smooth like a cubic
    # zoom but computed as two small matrix products, which keeps large images fast.
    def basis(n):
        centres = (np.arange(cells + 1) + 0.5) * n / (cells + 1)
        pos = np.arange(n) + 0.5
        return np.exp(-0.5 * ((pos[:, None] - centres[None, :]) / (0.6 * n / (cells + 1))) ** 2)

    coarse = rng.normal(0.0, 1.0, size=(cells + 1, cells + 1))
    field = basis(h) @ coarse @ basis(w).T
    field = field - field.mean()
    field = field / (np.abs(field).max() + 1e-8)
    return amplitude * field


def _box_downsample(array, factor):
    h, w = array.shape[0] // factor, array.shape[1] // factor
    shape = (h, factor, w, factor) + array.shape[2:]
    return array.reshape(shape).mean(axis=(1, 3))


def _luminance(img):
    return img @ np.array([0.299, 0.587, 0.114])


def _blob_distance(h, w, cy, cx, radius, rng, aspect=1.0, irregularity=0.15):
    # Signed distance (approximate, in pixels) to an irregular star-shaped outline:
    # negative inside, positive outside. Used for stains, holes and broken-off chunks.
    yy, xx = _pixel_grid(h, w)
    angle = rng.uniform(0.0, math.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    v = v / aspect
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    boundary = np.ones_like(r)
    for k in (2, 3, 4, 5):
        boundary += rng.uniform(0.0, irregularity / (k - 1)) * np.cos(k * phi + rng.uniform(0.0, 2 * math.pi))
    boundary *= radius
    return r - boundary


def _coverage(signed_distance, offset=0.0):
    return np.clip(0.5 - (signed_distance - offset), 0.0, 1.0)


def _render_texture(rng, h, w):
    ss = 2
    H, W = h * ss, w * ss
    s = min(h, w) * ss
    yy, xx = _pixel_grid(H, W)
    period = s * rng.uniform(0.085, 0.1)
    theta = math.radians(rng.normal(0.0, 2.5))
    u = xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0.0, period)
    v = -xx * math.sin(theta) + yy * math.cos(theta) + rng.uniform(0.0, period)
    # low-frequency warping so threads are not perfectly straight
    u = u + _smooth_field(rng, H, W, 3, 0.18 * period)
    v = v + _smooth_field(rng, H, W, 3, 0.18 * period)
    sin_u = np.abs(np.sin(math.pi * u / period))
    sin_v = np.abs(np.sin(math.pi * v / period))
    a_on_top = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    thread_a = sin_u ** 0.6 * (0.55 + 0.45 * sin_v)
    thread_b = sin_v ** 0.6 * (0.55 + 0.45 * sin_u)
    value = np.where(a_on_top, thread_a, thread_b)
    tint_b = np.where(a_on_top, 1.0, 0.93)
    grain = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=(H, W)), 0.8)
    grain = 0.05 * grain / (grain.std() + 1e-8)
    value = _box_downsample(value * tint_b + grain, ss)

    base = np.array([0.60, 0.50, 0.36]) + rng.normal(0.0, 0.008, size=3)
    illum = 1.0 + _smooth_field(rng, h, w, 2, 0.07)
    gy, gx = _pixel_grid(h, w)
    gdir = rng.uniform(0.0, 2 * math.pi)
    illum += 0.04 * ((gx / w - 0.5) * math.cos(gdir) + (gy / h - 0.5) * math.sin(gdir))
    img = base[None, None, :] * (0.5 + 0.6 * value)[..., None] * illum[..., None]
    # optical blur happens before any defect is drawn so the defect stays inside its mask
    img = ndimage.gaussian_filter(img, sigma=(0.5, 0.5, 0.0))
    return np.clip(img, 0.0, 1.0), {"scale": min(h, w)}


def _draw_supersampled(h, w, ss, draw_fn):
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw_fn(ImageDraw.Draw(canvas), ss)
    return _box_downsample(np.asarray(canvas, dtype=np.float64) / 255.0, ss)


def _render_object(rng, h, w):
    s = min(h, w)
    ss = 4
    cy = h / 2.0 + rng.normal(0.0, 0.02 * s)
    cx = w / 2.0 + rng.normal(0.0, 0.02 * s)
    R = 0.33 * s * rng.uniform(0.96, 1.04)
    rot = math.radians(rng.uniform(-10.0, 10.0))

    def polygon(points):
        return lambda draw, k: draw.polygon([(x * k, y * k) for x, y in points], fill=255)

    def disc(radius):
        return lambda draw, k: draw.ellipse([(cx - radius) * k, (cy - radius) * k,
                                             (cx + radius) * k, (cy + radius) * k], fill=255)

    hexagon = [(cx + R * math.cos(rot + math.pi / 6 + i * math.pi / 3),
                cy + R * math.sin(rot + math.pi / 6 + i * math.pi / 3)) for i in range(6)]
    hex_cov = _draw_supersampled(h, w, ss, polygon(hexagon))
    face_cov = _draw_supersampled(h, w, ss, disc(0.80 * R))
    hole_r = 0.36 * R
    hole_cov = _draw_supersampled(h, w, ss, disc(hole_r))
    rim_cov = _draw_supersampled(h, w, ss, disc(0.45 * R)) - hole_cov
    # printed mark: a small rotated bar on the face, like a maker's stamp
    ma = rot + math.radians(45.0)
    mx, my = cx + 0.62 * R * math.cos(ma), cy + 0.62 * R * math.sin(ma)
    half_l, half_t = 0.11 * R, 0.045 * R
    ca, sa = math.cos(ma + math.pi / 2), math.sin(ma + math.pi / 2)
    mark = [(mx + ex * half_l * ca - ey * half_t * sa, my + ex * half_l * sa + ey * half_t * ca)
            for ex, ey in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    mark_cov = _draw_supersampled(h, w, ss, polygon(mark))
    obj_alpha = np.clip(hex_cov - hole_cov, 0.0, 1.0)

    yy, xx = _pixel_grid(h, w)
    light = np.array([-0.7, -0.7]) + rng.normal(0.0, 0.1, size=2)
    shade = 1.0 + 0.12 * ((xx - cx) * light[0] + (yy - cy) * light[1]) / R
    brushed = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=(h, w)), sigma=(0.4, 2.5))
    shade = shade * (1.0 + 0.03 * brushed / (brushed.std() + 1e-8))
    chamfer = np.clip(hex_cov - face_cov, 0.0, 1.0)
    shade = shade * (1.0 - 0.18 * chamfer) * (1.0 + 0.12 * np.clip(rim_cov, 0.0, 1.0))
    metal = np.array([0.74, 0.63, 0.36]) + rng.normal(0.0, 0.015, size=3)
    obj = metal[None, None, :] * shade[..., None]
    ink = np.array([0.16, 0.14, 0.11])
    obj = obj * (1.0 - 0.85 * mark_cov[..., None]) + ink * 0.85 * mark_cov[..., None]

    bg_col = np.array([0.20, 0.21, 0.23]) * rng.uniform(0.95, 1.05)
    bg_light = 1.0 + 0.04 * ((xx / w - 0.5) * light[0] + (yy / h - 0.5) * light[1]) * 2.0
    bg_light = bg_light + _smooth_field(rng, h, w, 2, 0.02)
    shadow = ndimage.shift(hex_cov, (0.05 * R, 0.05 * R), order=1, mode="constant")
    shadow = ndimage.gaussian_filter(shadow, 0.06 * R)
    bg = bg_col[None, None, :] * (bg_light * (1.0 - 0.35 * shadow))[..., None]

    img = bg * (1.0 - obj_alpha[..., None]) + obj * obj_alpha[..., None]
    info = {"scale": s, "cy": cy, "cx": cx, "R": R, "hole_r": hole_r, "obj_alpha": obj_alpha,
            "background": np.clip(bg, 0.0, 1.0)}
    return np.clip(img, 0.0, 1.0), info


def _scratch_alpha(rng, h, w, center, length, width):
    direction = rng.uniform(0.0, math.pi)
    d = np.array([math.cos(direction), math.sin(direction)])
    n = np.array([-d[1], d[0]])
    c = np.asarray(center, dtype=np.float64)
    p0 = c - d * length / 2.0
    p2 = c + d * length / 2.0
    p1 = c + n * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0.0, 1.0, 40)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    ss = 4

    def draw(drawer, k):
        drawer.line([(float(x) * k, float(y) * k) for x, y in pts], fill=255,
                    width=max(1, int(round(width * k))), joint="curve")

    return _draw_supersampled(h, w, ss, draw)


def _contrast_target(img, alpha, rng):
    local = float((_luminance(img) * alpha).sum() / max(alpha.sum(), 1e-8))
    bright = np.array([0.93, 0.91, 0.87])
    dark = np.array([0.05, 0.045, 0.04])
    if local > 0.55:
        return dark
    if local < 0.35:
        return bright
    return bright if rng.random() < 0.5 else dark


def _blend(img, alpha, target):
    a = alpha[..., None]
    return img * (1.0 - a) + np.broadcast_to(target, img.shape) * a


def _defect_once(kind, defect, img, info, rng):
    h, w = img.shape[:2]
    s = info["scale"]
    if kind == "object":
        cy, cx, R = info["cy"], info["cx"], info["R"]
        obj_alpha = info["obj_alpha"]
        # defects that sit on the part's face: pick a point on the annulus between hole and edge
        ang = rng.uniform(0.0, 2 * math.pi)
        rad = rng.uniform(info["hole_r"] + 0.15 * R, 0.75 * R)
        on_face = (cy + rad * math.sin(ang), cx + rad * math.cos(ang))
    else:
        margin = 0.12 * s
        on_face = (rng.uniform(margin, h - margin), rng.uniform(margin, w - margin))

    if defect == "scratch":
        if kind == "object":
            length = rng.uniform(0.9, 1.4) * R
        else:
            length = rng.uniform(0.45, 0.85) * s
        width = rng.uniform(s / 40.0, s / 24.0)
        alpha = _scratch_alpha(rng, h, w, (on_face[1], on_face[0]), length, width)
        if kind == "object":
            alpha = alpha * obj_alpha
        target = _contrast_target(img, alpha, rng)
        alpha = alpha * rng.uniform(0.75, 0.95)
        return _blend(img, alpha, target), alpha > 0

    if defect == "stain":
        if kind == "object":
            radius = rng.uniform(0.2, 0.34) * R
        else:
            radius = rng.uniform(0.08, 0.17) * s
        sd = _blob_distance(h, w, on_face[0], on_face[1], radius, rng,
                            aspect=rng.uniform(0.6, 1.0), irregularity=0.25)
        inside = sd < 0.0
        depth = ndimage.distance_transform_edt(inside)
        soft = np.clip(depth / max(1.5, 0.4 * radius), 0.0, 1.0)
        alpha = rng.uniform(0.65, 0.85) * (0.3 + 0.7 * soft) * inside
        if kind == "object":
            alpha = alpha * obj_alpha
        palette = (np.array([0.55, 0.26, 0.08]), np.array([0.10, 0.09, 0.08]),
                   np.array([0.22, 0.42, 0.40]), np.array([0.35, 0.30, 0.55]))
        colour = palette[int(rng.integers(len(palette)))]
        lum = _luminance(img)
        # keep some of the underlying structure visible through the stain
        texture_keep = (0.7 + 0.3 * lum / (lum.mean() + 1e-8))[..., None]
        target = np.clip(colour[None, None, :] * texture_keep, 0.0, 1.0)
        return _blend(img, alpha, target), alpha > 0

    if defect == "hole":
        radius = rng.uniform(0.06, 0.12) * s
        sd = _blob_distance(h, w, on_face[0], on_face[1], radius, rng,
                            aspect=rng.uniform(0.55, 1.0), irregularity=0.12)
        rim_width = max(1.5, 0.35 * radius)
        rim_alpha = 0.55 * _coverage(sd, rim_width)
        frayed = np.clip(img * 1.35 + 0.05, 0.0, 1.0)
        out = _blend(img, rim_alpha, frayed)
        hole_alpha = 0.95 * _coverage(sd)
        depth_shade = np.clip(0.04 + 0.05 * np.clip(-sd / radius, 0.0, 1.0), 0.0, 1.0)
        dark = np.array([1.0, 0.9, 0.8])[None, None, :] * depth_shade[..., None]
        out = _blend(out, hole_alpha, dark)
        return out, rim_alpha > 0

    if defect == "missing_part":
        ang = rng.uniform(0.0, 2 * math.pi)
        rad = rng.uniform(0.8, 1.0) * R
        radius = rng.uniform(0.3, 0.5) * R
        sd = _blob_distance(h, w, cy + rad * math.sin(ang), cx + rad * math.cos(ang), radius, rng,
                            aspect=rng.uniform(0.6, 1.0), irregularity=0.3)
        alpha = _coverage(sd) * (obj_alpha > 0)
        return _blend(img, alpha, info["background"]), alpha > 0

    raise ValueError(f"unknown defect {defect!r}")


def _apply_defect(kind, defect, img, info, rng):
    h, w = img.shape[:2]
    # relative to the square of the short side: the part and the texture period scale with it,
    # so elongated images do not demand bigger defects than the part can hold
    min_area = max(4, int(math.ceil(MIN_DEFECT_FRACTION * min(h, w) ** 2)))
    best = None
    for _ in range(50):
        out, mask = _defect_once(kind, defect, img, info, rng)
        area = int(mask.sum())
        contrast = float(np.abs(out - img).max(axis=-1)[mask].mean()) if area else 0.0
        if area >= min_area and contrast >= MIN_DEFECT_CONTRAST:
            return out, mask
        if best is None or area > best[2]:
            best = (out, mask, area)
    # practically unreachable; fall back to the largest attempt rather than looping forever
    return best[0], best[1]


def render_sample(kind="texture", image_size=64, seed=0, defect=None):
    kind = _check_kind(kind)
    h, w = _normalize_size(image_size)
    defect = _check_defect(kind, defect)
    entropy = [int(x) for x in (seed if isinstance(seed, (list, tuple)) else [seed])]
    # separate streams so that a defective image equals its clean twin outside the mask
    base_ss, defect_ss, noise_ss = np.random.SeedSequence(entropy).spawn(3)
    base_rng = np.random.default_rng(base_ss)
    if kind == "texture":
        img, info = _render_texture(base_rng, h, w)
    else:
        img, info = _render_object(base_rng, h, w)
    mask = None
    if defect is not None:
        img, mask = _apply_defect(kind, defect, img, info, np.random.default_rng(defect_ss))
    noise_rng = np.random.default_rng(noise_ss)
    sigma = noise_rng.uniform(0.008, 0.016)
    img = img + noise_rng.normal(0.0, sigma, size=img.shape)
    image = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image, mask


def _save_png(path, array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _stem(index):
    return f"{index:03d}"


def _expected_files(cat_dir, kind, num_train, num_test_good, num_test_defect):
    files = [cat_dir / "train" / "good" / f"{_stem(i)}.png" for i in range(num_train)]
    files += [cat_dir / "test" / "good" / f"{_stem(i)}.png" for i in range(num_test_good)]
    for defect in DEFECT_TYPES[kind]:
        for i in range(num_test_defect):
            files.append(cat_dir / "test" / defect / f"{_stem(i)}.png")
            files.append(cat_dir / "ground_truth" / defect / f"{_stem(i)}_mask.png")
    return files


def _read_marker(cat_dir):
    try:
        return json.loads((cat_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(cat_dir, params, complete):
    text = json.dumps({"params": params, "complete": complete}, indent=2) + "\n"
    atomic_write_bytes(cat_dir / MARKER_NAME, text.encode("utf-8"))


def _clear_generated(cat_dir):
    for name in ("train", "test", "ground_truth"):
        if (cat_dir / name).is_dir():
            shutil.rmtree(cat_dir / name)
    marker = cat_dir / MARKER_NAME
    if marker.exists():
        marker.unlink()


def generate_synthetic_category(root, category="demo", kind="texture", image_size=64, num_train=40,
                                num_test_good=10, num_test_defect=10, seed=0, overwrite=False):
    kind = _check_kind(kind)
    h, w = _normalize_size(image_size)
    num_train = _check_int("num_train", num_train, MIN_TRAIN_IMAGES,
                           " (a covariance needs two training images, and the validation split is taken from them)")
    num_test_good = _check_int("num_test_good", num_test_good, 1,
                               " (the test split needs good images for image-level metrics)")
    num_test_defect = _check_int("num_test_defect", num_test_defect, 1,
                                 " (the test split needs defective images of every type)")
    seed = _check_int("seed", seed, 0)
    if not isinstance(category, str) or not category or category in (".", "..") or "/" in category \
            or "\\" in category:
        raise ValueError(f"category must be a plain folder name, got {category!r}")

    cat_dir = Path(root) / category
    params = {
        "generator_version": GENERATOR_VERSION,
        "category": category,
        "kind": kind,
        "image_size": [h, w],
        "num_train": num_train,
        "num_test_good": num_test_good,
        "num_test_defect": num_test_defect,
        "seed": seed,
        "defect_types": list(DEFECT_TYPES[kind]),
    }
    expected = _expected_files(cat_dir, kind, num_train, num_test_good, num_test_defect)

    if cat_dir.exists():
        marker = _read_marker(cat_dir)
        same = marker is not None and marker.get("params") == params
        if same and marker.get("complete") and all(p.is_file() for p in expected):
            logger.info("synthetic category %s is up to date", cat_dir)
            return cat_dir
        is_empty = not any(cat_dir.iterdir())
        # same parameters but unfinished: it is our own partial output, safe to redo
        if not (same or is_empty or overwrite):
            reason = "different parameters" if marker is not None else "data not made by this generator"
            raise FileExistsError(f"{cat_dir} already exists with {reason}; pass overwrite=True to "
                                  f"regenerate it")
        _clear_generated(cat_dir)

    cat_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(cat_dir, params, complete=False)
    logger.info("generating synthetic %s category at %s", kind, cat_dir)
    kind_code = SYNTHETIC_KINDS.index(kind)
    for i in range(num_train):
        image, _ = render_sample(kind, (h, w), [seed, kind_code, _SPLIT_TRAIN, 0, i])
        _save_png(cat_dir / "train" / "good" / f"{_stem(i)}.png", image)
    for i in range(num_test_good):
        image, _ = render_sample(kind, (h, w), [seed, kind_code, _SPLIT_TEST_GOOD, 0, i])
        _save_png(cat_dir / "test" / "good" / f"{_stem(i)}.png", image)
    for d_index, defect in enumerate(DEFECT_TYPES[kind]):
        for i in range(num_test_defect):
            image, mask = render_sample(kind, (h, w), [seed, kind_code, _SPLIT_TEST_DEFECT, d_index, i], defect)
            _save_png(cat_dir / "test" / defect / f"{_stem(i)}.png", image)
            _save_png(cat_dir / "ground_truth" / defect / f"{_stem(i)}_mask.png",
                      mask.astype(np.uint8) * 255)
    _write_marker(cat_dir, params, complete=True)
    return cat_dir
