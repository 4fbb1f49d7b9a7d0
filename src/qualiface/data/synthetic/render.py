"""Procedural face-like images drawn with OpenCV: the renderer behind the ``synthetic`` dataset.

* **Identities** are parameter sets: face and jaw shape, skin tone, ears, eye spacing, size and
  iris colour, eyebrow shape, nose, mouth width and lips, hair style and colour, and
  identity-specific marks (moles, freckles, moustache/beard, glasses). ``make_identity`` makes
  them a function of ``(seed, global identity id)`` only.
* **Samples**: ``render_face`` draws one person from ``SAMPLE_DRAWS`` uniform numbers that jitter
  pose (rotation, translation, scale, a small yaw shift of the inner features), expression
  (smile/frown, open mouth, eye openness), illumination (direction, strength, brightness, tint),
  background and clothing.
* Crops are 112x112 RGB (or ``size``), roughly aligned like real ones: the average identity has
  its eyes, nose tip and mouth corners on the five-point template; ``face_landmarks`` gives a
  sample's actual five points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from qualiface.data.alignment import TEMPLATE_112, TEMPLATE_SIZE

# Faces are drawn on the five-point alignment template (x, y) of 112x112 face crops.
TEMPLATE = TEMPLATE_112.astype(np.float32)

_SKIN_LIGHT = np.array([236, 204, 178], dtype=np.float32)
_SKIN_DARK = np.array([96, 64, 48], dtype=np.float32)
_HAIR_COLOURS = np.array(
    [[28, 24, 22], [62, 42, 30], [105, 72, 44], [196, 164, 108], [148, 72, 38], [168, 166, 162]],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array(
    [[72, 44, 26], [40, 26, 18], [70, 110, 160], [80, 120, 70], [120, 90, 50], [120, 130, 140]],
    dtype=np.float32,
)
#: Number of uniform draws per sample (pose, expression, illumination, scene colours).
SAMPLE_DRAWS = 16


@dataclass
class FaceIdentity:
    """Geometry (template pixels) and colours (RGB 0-255) of one synthetic person."""

    face_half_width: float
    face_half_height: float
    face_centre_y: float
    jaw_ratio: float
    skin: np.ndarray
    ear_size: float
    eye_half_spacing: float
    eye_y: float
    eye_width: float
    eye_height: float
    iris_radius: float
    iris: np.ndarray
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    brow_slant: float
    brow_length: float
    nose_width: float
    nose_length: float
    mouth_half_width: float
    mouth_y: float
    lip_thickness: float
    lips: np.ndarray
    hair: np.ndarray
    hair_style: int  # 0 short cap, 1 long, 2 receding/bald, 3 side parting
    hairline_y: float
    hair_volume: float
    moles: np.ndarray  # (M, 3): x, y offsets from the face centre (unit: face half-axes), radius
    freckles: np.ndarray  # (F, 2) offsets as above; empty when the person has none
    moustache: bool
    beard: bool
    glasses: bool
    glasses_colour: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))


def _identity_seed(seed: int, global_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, global_id, 0x1D])


def make_identity(seed: int, global_id: int) -> FaceIdentity:
    """The parameters of identity ``global_id`` for ``seed`` (pure function of both)."""
    rng = _identity_seed(seed, global_id)
    u = rng.random

    tone = u() ** 1.3  # more light-to-medium tones than very dark ones, as in typical sets
    skin = (_SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone) * (1 + 0.06 * (rng.random(3) - 0.5))
    hair_pick = rng.integers(len(_HAIR_COLOURS))
    hair = _HAIR_COLOURS[hair_pick] * (0.85 + 0.3 * u())
    lips = skin * np.array([0.78, 0.52, 0.52]) + np.array([30, 4, 8]) * u()

    mole_count = int(rng.integers(0, 4))
    moles = np.column_stack(
        [rng.uniform(-0.7, 0.7, mole_count), rng.uniform(-0.3, 0.75, mole_count),
         rng.uniform(0.7, 1.6, mole_count)]
    )
    freckles = (
        np.column_stack([rng.uniform(-0.6, 0.6, 24), rng.uniform(0.0, 0.4, 24)])
        if u() < 0.2 else np.zeros((0, 2))
    )
    return FaceIdentity(
        face_half_width=33.0 + 7.0 * u(),
        face_half_height=44.0 + 7.0 * u(),
        face_centre_y=58.0 + 4.0 * u(),
        jaw_ratio=0.7 + 0.3 * u(),
        skin=skin.astype(np.float32),
        ear_size=5.0 + 3.0 * u(),
        eye_half_spacing=17.6 + 5.0 * (u() - 0.5),
        eye_y=51.6 + 4.0 * (u() - 0.5),
        eye_width=5.2 + 2.0 * u(),
        eye_height=2.6 + 1.2 * u(),
        iris_radius=2.3 + 0.8 * u(),
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))],
        brow_gap=7.5 + 4.0 * u(),
        brow_thickness=1.6 + 2.2 * u(),
        brow_arch=0.5 + 3.0 * u(),
        brow_slant=3.0 * (u() - 0.5),
        brow_length=13.0 + 6.0 * u(),
        nose_width=5.0 + 4.5 * u(),
        nose_length=12.0 + 7.0 * u(),
        mouth_half_width=14.6 + 5.0 * (u() - 0.5),
        mouth_y=92.3 + 4.0 * (u() - 0.5),
        lip_thickness=1.6 + 2.4 * u(),
        lips=np.clip(lips, 0, 255).astype(np.float32),
        hair=np.clip(hair, 0, 255).astype(np.float32),
        hair_style=int(rng.integers(4)),
        hairline_y=26.0 + 10.0 * u(),
        hair_volume=2.0 + 6.0 * u(),
        moles=moles.astype(np.float32),
        freckles=freckles.astype(np.float32),
        moustache=bool(u() < 0.25),
        beard=bool(u() < 0.15),
        glasses=bool(u() < 0.15),
        glasses_colour=(np.array([25, 25, 30]) + 120 * rng.random(3) * (u() < 0.4)).astype(
            np.float32
        ),
    )


class _Canvas:
    """cv2 drawing in template coordinates (112-px units) with sub-pixel precision."""

    SHIFT = 4  # cv2 fixed-point bits: coordinates are multiplied by 16

    def __init__(self, size: int) -> None:
        self.size = size
        self.unit = size / TEMPLATE_SIZE
        self._fixed = self.unit * (1 << self.SHIFT)
        self.image = np.empty((size, size, 3), dtype=np.uint8)

    def _pt(self, x: float, y: float) -> tuple[int, int]:
        return int(round(x * self._fixed)), int(round(y * self._fixed))

    def _width(self, thickness: float) -> int:
        return max(1, int(round(thickness * self.unit)))

    def ellipse(self, cx, cy, ax, ay, colour, angle=0.0, start=0, end=360, thickness=-1.0,
                image=None) -> None:
        cv2.ellipse(
            self.image if image is None else image, self._pt(cx, cy),
            self._pt(max(ax, 0.05), max(ay, 0.05)), angle, start, end, _colour(colour),
            -1 if thickness < 0 else self._width(thickness), cv2.LINE_AA, self.SHIFT,
        )

    def polyline(self, points: np.ndarray, colour, thickness: float, closed=False) -> None:
        fixed = np.round(points * self._fixed).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(self.image, [fixed], closed, _colour(colour), self._width(thickness),
                      cv2.LINE_AA, self.SHIFT)

    def polygon(self, points: np.ndarray, colour, image=None) -> None:
        fixed = np.round(points * self._fixed).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.image if image is None else image, [fixed], _colour(colour),
                     cv2.LINE_AA, self.SHIFT)

    def blend(self, layer: np.ndarray, alpha: float) -> None:
        cv2.addWeighted(layer, alpha, self.image, 1.0 - alpha, 0.0, dst=self.image)


def _colour(rgb) -> tuple[float, float, float]:
    # Plain Python clamping: this runs ~100 times per image and np.clip's overhead dominated.
    r, g, b = (min(255.0, max(0.0, float(c))) for c in rgb)
    return (r, g, b)


_BEZIER_POINTS = 9
_t = np.linspace(0.0, 1.0, _BEZIER_POINTS)[:, None]
_BEZIER_WEIGHTS = np.stack([(1 - _t) ** 2, 2 * (1 - _t) * _t, _t**2])  # (3, n, 1)


def _curve(p0, p1, p2) -> np.ndarray:
    """Quadratic Bezier from p0 to p2 pulled towards p1, (9, 2)."""
    w = _BEZIER_WEIGHTS
    return w[0] * np.asarray(p0) + w[1] * np.asarray(p1) + w[2] * np.asarray(p2)


@dataclass(frozen=True)
class _Expression:
    yaw: float  # sideways shift (template px) of the inner features: a slight head turn
    smile: float  # -0.6 (frown) ... 1.4 (broad smile)
    mouth_open: float  # gap between the lips, template px
    eye_open: float  # eyelid opening relative to the person's eye height


def _expression(draws: np.ndarray) -> _Expression:
    return _Expression(
        yaw=3.0 * (float(draws[0]) - 0.5),
        smile=2.0 * float(draws[1]) - 0.6,
        mouth_open=max(0.0, float(draws[2]) - 0.7) * 8.0,
        # ~8% of samples blink.
        eye_open=0.25 + 0.85 * float(draws[3]) if draws[3] > 0.08 else 0.12,
    )


def _pose_matrix(draws: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine of the sample's pose jitter (rotation +-8 deg, scale 0.93-1.07, shift +-3 px
    at 112) about the image centre, in output pixels."""
    angle = 16.0 * (float(draws[13]) - 0.5)
    scale = 0.93 + 0.14 * float(draws[14])
    shift = 6.0 * (float(draws[15]) - 0.5) * size / TEMPLATE_SIZE
    warp = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, scale)
    warp[:, 2] += (shift, -0.6 * shift)
    return warp


def face_landmarks(
    person: FaceIdentity, draws: np.ndarray, size: int = TEMPLATE_SIZE
) -> np.ndarray:
    """The five landmarks (eyes, nose tip, mouth corners) of a rendered sample, (5, 2) float32
    (x, y) in output pixels, in the order of ``TEMPLATE``."""
    e = _expression(draws)
    cx = TEMPLATE_SIZE / 2.0
    mouth_y = person.mouth_y - e.smile * 1.5
    points = np.array([
        [cx - person.eye_half_spacing + e.yaw, person.eye_y],
        [cx + person.eye_half_spacing + e.yaw, person.eye_y],
        [TEMPLATE[2, 0] + e.yaw * 1.3, TEMPLATE[2, 1]],
        [cx - person.mouth_half_width + e.yaw, mouth_y],
        [cx + person.mouth_half_width + e.yaw, mouth_y],
    ]) * (size / TEMPLATE_SIZE)
    warp = _pose_matrix(draws, size)
    return (points @ warp[:, :2].T + warp[:, 2]).astype(np.float32)


def render_face(person: FaceIdentity, draws: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Draw one sample of ``person``: (size, size, 3) uint8 RGB.

    ``draws`` holds ``SAMPLE_DRAWS`` uniform numbers in [0, 1) that set the pose, expression,
    illumination and scene colours of this sample.
    """
    d = draws
    canvas = _Canvas(size)
    cx = TEMPLATE_SIZE / 2.0
    expression = _expression(d)
    yaw, smile = expression.yaw, expression.smile
    mouth_open, eye_open = expression.mouth_open, expression.eye_open

    # Scene: background gradient, clothes.
    bg_top = 60 + 170 * np.array([d[4], d[5], d[6]])
    bg_bottom = bg_top * (0.6 + 0.5 * d[7])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    canvas.image[:] = (bg_top * (1 - ramp) + bg_bottom * ramp).astype(np.uint8)
    clothes = 30 + 200 * np.array([d[8], d[5], d[4]]) * np.array([1.0, 0.8, 0.9])

    fw, fh, fy = person.face_half_width, person.face_half_height, person.face_centre_y
    skin = person.skin
    shade = skin * 0.82

    if person.hair_style == 1:  # long hair falls behind the head down to the shoulders
        canvas.ellipse(cx, fy + 8, fw + person.hair_volume + 3, fh + 10, person.hair)
        canvas.polygon(np.array([[cx - fw - 8, fy], [cx + fw + 8, fy], [cx + fw + 11, 118],
                                 [cx - fw - 11, 118]]), person.hair)
    canvas.ellipse(cx, 128, 54, 26, clothes)  # shoulders
    neck_w = fw * 0.55
    canvas.polygon(np.array([[cx - neck_w, fy + 20], [cx + neck_w, fy + 20],
                             [cx + neck_w + 2, 118], [cx - neck_w - 2, 118]]), shade)
    for side in (-1, 1):  # ears at eye-to-nose height
        canvas.ellipse(cx + side * (fw - 1), person.eye_y + 9, person.ear_size,
                       person.ear_size * 1.7, shade)
    # Face = cranium ellipse + jaw ellipse (jaw_ratio < 1 narrows the chin).
    canvas.ellipse(cx, fy - 4, fw, fh * 0.8, skin)
    canvas.ellipse(cx, fy + 8, fw * person.jaw_ratio + (1 - person.jaw_ratio) * 8,
                   fh * 0.78, skin)

    # Hair on top of the head.
    top = fy - 4 - fh * 0.8
    if person.hair_style in (0, 1, 3):
        parting = 0.0 if person.hair_style != 3 else 6.0 * (1 if person.hairline_y > 31 else -1)
        canvas.ellipse(cx + parting * 0.3, person.hairline_y, fw + person.hair_volume * 0.5,
                       person.hairline_y - top + person.hair_volume, person.hair,
                       angle=parting, start=180, end=360)
        for side in (-1, 1):  # sideburns down to the ears
            canvas.ellipse(cx + side * (fw - 2), person.hairline_y + 6, 4.0, 12.0, person.hair)
    else:  # receding: short hair on the temples and a thin crown
        for side in (-1, 1):
            canvas.ellipse(cx + side * (fw - 2.5), person.hairline_y + 10, 2.5, 8.0, person.hair,
                           angle=-side * 10.0)
        canvas.ellipse(cx, top + 4, fw * 0.75, 4.0, person.hair, start=180, end=360)

    # Faint cheek shading keeps faces from looking flat.
    shadow = canvas.image.copy()
    for side in (-1, 1):
        canvas.ellipse(cx + side * fw * 0.62, fy + 16, fw * 0.24, fh * 0.26, shade, image=shadow)
    canvas.blend(shadow, 0.18)

    # Marks drawn under the features.
    for mx, my, mr in person.moles:
        canvas.ellipse(cx + mx * fw + yaw, fy + my * fh, mr, mr, skin * 0.45)
    if len(person.freckles):
        dots = canvas.image.copy()
        for fx_, fy_ in person.freckles:
            canvas.ellipse(cx + fx_ * fw + yaw, fy + fy_ * fh, 0.8, 0.8, skin * 0.6, image=dots)
        canvas.blend(dots, 0.45)
    if person.beard or person.moustache:
        fuzz = canvas.image.copy()
        if person.beard:
            canvas.ellipse(cx, person.mouth_y - 4, fw * person.jaw_ratio * 0.95 + 3, fh * 0.55,
                           person.hair, start=0, end=180, image=fuzz)
        canvas.ellipse(cx + yaw, person.mouth_y - 5.5, person.mouth_half_width + 2, 3.2,
                       person.hair, image=fuzz)
        canvas.blend(fuzz, 0.75)

    # Eyes, eyebrows, glasses.
    for side in (-1, 1):
        ex = cx + side * person.eye_half_spacing + yaw
        ey = person.eye_y
        eh = max(0.5, person.eye_height * eye_open)
        canvas.ellipse(ex, ey, person.eye_width, eh, (238, 236, 232))
        iris_h = min(person.iris_radius, eh)
        gaze = yaw * 0.3
        canvas.ellipse(ex + gaze, ey, person.iris_radius, iris_h, person.iris)
        canvas.ellipse(ex + gaze, ey, person.iris_radius * 0.45, min(iris_h, 1.1), (15, 12, 12))
        canvas.ellipse(ex, ey, person.eye_width, eh, skin * 0.35, start=180, end=360,
                       thickness=1.0)
        inner = ex - side * person.brow_length * 0.45
        outer = ex + side * person.brow_length * 0.55
        by = ey - person.brow_gap
        brow = _curve((inner, by + person.brow_slant), (ex, by - person.brow_arch - 1.0),
                      (outer, by - person.brow_slant * 0.5 + 1.5))
        canvas.polyline(brow, person.hair * 0.8, person.brow_thickness)
        if person.glasses:
            canvas.ellipse(ex, ey + 1, 10.0, 8.0, person.glasses_colour, thickness=1.3)
    if person.glasses:
        bridge_y = person.eye_y - 1
        canvas.polyline(np.array([[cx - person.eye_half_spacing + 10 + yaw, bridge_y],
                                  [cx + person.eye_half_spacing - 10 + yaw, bridge_y]]),
                        person.glasses_colour, 1.3)

    # Nose: tip near the template point, nostrils, a soft bridge line.
    tip_x, tip_y = TEMPLATE[2, 0] + yaw * 1.3, TEMPLATE[2, 1]
    canvas.ellipse(tip_x, tip_y - 1, person.nose_width * 0.45, 3.0, skin * 0.92)
    for side in (-1, 1):
        canvas.ellipse(tip_x + side * person.nose_width * 0.4, tip_y + 1.5, 1.6, 1.0, skin * 0.5)
    canvas.polyline(_curve((tip_x - 2.5, tip_y - person.nose_length),
                           (tip_x - 3.5, tip_y - person.nose_length * 0.4),
                           (tip_x - person.nose_width * 0.55, tip_y + 0.5)),
                    skin * 0.78, 1.0)

    # Mouth: corners near the template, curvature from the expression.
    my = person.mouth_y
    left, right = np.array([cx - person.mouth_half_width + yaw, my]), np.array(
        [cx + person.mouth_half_width + yaw, my])
    left[1] -= smile * 1.5
    right[1] -= smile * 1.5
    mid_x = cx + yaw
    upper = _curve(left, (mid_x, my - person.lip_thickness - 1.0 + smile * 0.6), right)
    lower = _curve(right, (mid_x, my + person.lip_thickness + mouth_open + smile * 2.5), left)
    canvas.polygon(np.vstack([upper, lower]), person.lips)
    if mouth_open > 0.5:
        gap_top = _curve(left, (mid_x, my + smile * 0.8), right)
        gap_bottom = _curve(right, (mid_x, my + mouth_open + smile * 2.0), left)
        canvas.polygon(np.vstack([gap_top, gap_bottom]), (60, 20, 25))
    canvas.polyline(_curve(left, (mid_x, my + smile * 1.6 + mouth_open * 0.5), right),
                    person.lips * 0.6, 1.0)

    # Illumination: directional ramp, overall brightness and a colour tint.
    direction = 2.0 * math.pi * d[9]
    strength = 0.45 * d[10]
    brightness = 0.75 + 0.45 * d[11]
    tint = 1.0 + 0.12 * (np.array([d[12], 0.5, 1.0 - d[12]], dtype=np.float32) - 0.5)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    ramp = (axis[None, :] * math.cos(direction) + axis[:, None] * math.sin(direction))
    light = (brightness * (1.0 + strength * ramp))[:, :, None] * tint
    lit = canvas.image.astype(np.float32) * light

    # Pose: rotate/scale about the image centre and translate, like alignment residuals.
    warped = cv2.warpAffine(lit, _pose_matrix(d, size), (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)
    return np.clip(warped, 0, 255).astype(np.uint8)
