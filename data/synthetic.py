"""A deterministic synthetic long-video QA set: the demo's default data.

Each video is hundreds of frames of drifting grey texture and noise in which one coloured shape flashes
up for a few frames, once to three times. Questions ask what appeared, its colour, when it first
appeared (beginning / middle / end) and how often, open-ended and multiple-choice (A-D, answered with the
letter). A model that sees only a short stretch of the video almost always misses the event.

`generate(out_dir, num_videos, seed)` writes `out_dir/videos/*.mp4` (H.264 through PyAV, so the demo goes
through real decoding), `out_dir/annotations.json` (LLaVA-Video-178K format: one entry per video, one
multi-turn conversation with one question of each kind, each open-ended or multiple-choice at random) and
`out_dir/questions.json` (every question in both forms, one item each, for evaluation:
`{id, video, kind, form, question, options, answer}`; `options` is empty for open-ended items).
Its keyword arguments set the video length and size, the shape's size and duration, the background's
brightness, the question kinds and forms, and one single-question entry per video and kind instead of
one conversation (the CPU demo's choices are in `launch/demo.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 200, 50), "blue": (40, 70, 230),
    "yellow": (235, 220, 40), "magenta": (220, 40, 220), "cyan": (40, 220, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
KINDS = ("what", "colour", "when", "count")
WHEN = ("at the beginning", "in the middle", "at the end")
COUNTS = ("once", "twice", "three times", "four times")
SIZES = ((64, 64), (64, 96), (96, 64), (80, 112), (112, 112))  # (height, width); even for yuv420p
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Event:
    """One video's salient event: a shape of a colour shown `count` times, `duration` frames each."""

    shape: str
    colour: str
    starts: tuple[int, ...]  # first frame of each occurrence, increasing
    duration: int
    when: str  # third of the video holding the first occurrence
    centre: tuple[float, float]  # (y, x) as fractions of the frame
    radius: float  # fraction of the shorter side


def shape_mask(shape: str, height: int, width: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean mask [H, W] of a shape centred at `centre` (fractions) with `radius` (fraction of min side)."""
    r = radius * min(height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    dy, dx = (y - centre[0] * height) / r, (x - centre[1] * width) / r
    if shape == "circle":
        return dx**2 + dy**2 <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 0.8) & (np.abs(dy) <= 0.8)
    if shape == "triangle":  # apex up, base at dy = 0.7
        return (dy <= 0.7) & (np.abs(dx) <= (dy + 1.0) * 0.6)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, num_frames: int, height: int, width: int,
                level: float = 115.0) -> np.ndarray:
    """Grey frames [T, H, W, 3] uint8 around grey `level`: two drifting sinusoidal gratings plus per-frame noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.arange(num_frames, dtype=np.float32)[:, None, None]
    out = np.full((num_frames, height, width), level, np.float32)
    for _ in range(2):
        angle, freq, speed = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.3)
        phase = freq * (x * np.cos(angle) + y * np.sin(angle))
        out += rng.uniform(15, 30) * np.sin(phase[None] + speed * t)
    out += 6.0 * rng.standard_normal(out.shape, dtype=np.float32)
    return np.repeat(np.clip(out, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _sample_event(rng: np.random.Generator, num_frames: int, duration_range: tuple[int, int],
                  radius_range: tuple[float, float] = (0.22, 0.3)) -> Event:
    duration = int(rng.integers(duration_range[0], duration_range[1] + 1))
    count = int(rng.integers(1, 4))
    third = int(rng.integers(0, 3))
    # The first occurrence sits inside its third, away from the borders, so "when" is unambiguous.
    lo = int(num_frames * (third / 3 + 0.04))
    hi = int(num_frames * ((third + 1) / 3 - 0.04)) - duration
    first = int(rng.integers(lo, max(lo, hi) + 1))
    gap = 2 * duration
    starts = [first]
    while len(starts) < count:  # later occurrences anywhere after the first, separated by >= gap frames
        candidates = [s for s in range(first + duration + gap, num_frames - duration)
                      if all(abs(s - o) >= duration + gap for o in starts)]
        if not candidates:  # a short video may not have room: fewer occurrences
            break
        starts.append(int(rng.choice(candidates)))
    radius = float(rng.uniform(*radius_range))
    margin = radius + 0.05
    centre = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
    return Event(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))), starts=tuple(sorted(starts)),
                 duration=duration, when=WHEN[third], centre=centre, radius=radius)


def render_video(rng: np.random.Generator, event: Event, num_frames: int, height: int, width: int,
                 background_level: float = 115.0) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of the background (mean grey `background_level`) with the event drawn in."""
    frames = _background(rng, num_frames, height, width, background_level)
    mask = shape_mask(event.shape, height, width, event.centre, event.radius)
    for start in event.starts:
        frames[start:start + event.duration, mask] = COLOURS[event.colour]
    return frames


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """Encodes RGB frames [T, H, W, 3] uint8 as H.264 (yuv420p) in an mp4 file."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # One thread and a constant quantiser: x264's threads and rate-control lookahead vary the bytes.
        stream.codec_context.thread_count = 1
        stream.options = {"qp": "20", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _questions(event: Event) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Per kind: (question, open-ended answer, answer options with the correct one first)."""
    count = len(event.starts)
    return {
        "what": ("What shape briefly appears in the video?", f"A {event.shape}.", (event.shape,)
                 + tuple(s for s in SHAPES if s != event.shape)),
        "colour": ("What colour is the shape that briefly appears in the video?", f"{event.colour.capitalize()}.",
                   (event.colour,) + tuple(c for c in COLOURS if c != event.colour)),
        "when": ("When does the shape first appear in the video?", f"{event.when.capitalize()}.",
                 (event.when,) + tuple(w for w in WHEN if w != event.when) + ("it never appears",)),
        "count": ("How many times does the shape appear in the video?", f"{COUNTS[count - 1].capitalize()}.",
                  (COUNTS[count - 1],) + tuple(c for c in COUNTS if c != COUNTS[count - 1])),
    }


def _multiple_choice(rng: np.random.Generator, question: str, options: tuple[str, ...]) -> tuple[str, list[str], str]:
    """(prompt, options, answer letter): the correct option and three distractors in random order."""
    distractors = list(rng.permutation(np.array(options[1:], dtype=object))[:3])
    shuffled = [options[0]] + distractors
    order = rng.permutation(4)
    shuffled = [str(shuffled[i]) for i in order]
    lines = [f"{LETTERS[i]}. {opt.capitalize()}" for i, opt in enumerate(shuffled)]
    prompt = "\n".join([question, *lines, MC_SUFFIX])
    return prompt, shuffled, LETTERS[int(np.flatnonzero(order == 0)[0])]


def generate(out_dir: str | os.PathLike, num_videos: int = 96, seed: int = 0, *,
             frames_range: tuple[int, int] = (240, 400), fps: int = 8,
             duration_range: tuple[int, int] = (4, 6), sizes: Sequence[tuple[int, int]] = SIZES,
             radius_range: tuple[float, float] = (0.22, 0.3), background_level: float = 115.0,
             kinds: Sequence[str] = KINDS, open_fraction: float = 0.5, one_question_per_entry: bool = False) -> str:
    """Writes the videos, `annotations.json` and `questions.json`; returns the annotation path.

    Deterministic in `seed`: the same arguments give the same frames, events and questions.
    `frames_range` bounds the frame count of a video (inclusive), `fps` its frame rate,
    `duration_range` how many frames one occurrence of the event lasts, `sizes` the (height, width)
    frame sizes drawn from (even numbers), `radius_range` the shape's size (fraction of the shorter
    side; a radius of 0.45 centres it) and `background_level` the background's mean grey (on a dark
    one every colour is brighter than most of the background, so the shape's outline hardly depends on
    its colour). `kinds` are the question kinds asked (of `KINDS`) and `open_fraction` the chance that
    an annotated question is open-ended rather than multiple-choice (`questions.json` has both forms).
    With `one_question_per_entry` the annotations hold one single-turn entry per video and kind (id
    `<video id>_<kind>`) instead of one multi-turn conversation per video.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    rng = np.random.default_rng(seed)
    annotations, questions = [], []
    for v in range(num_videos):
        num_frames = int(rng.integers(frames_range[0], frames_range[1] + 1))
        height, width = sizes[int(rng.integers(len(sizes)))]
        event = _sample_event(rng, num_frames, duration_range, radius_range)
        name = f"videos/synth_{seed}_{v:04d}.mp4"
        frames = render_video(rng, event, num_frames, height, width, background_level)
        write_mp4(os.path.join(out_dir, name), frames, fps)
        turns = []
        for kind, (question, answer, options) in _questions(event).items():
            if kind not in kinds:
                continue
            prompt, shuffled, letter = _multiple_choice(rng, question, options)
            base = f"synth_{seed}_{v:04d}_{kind}"
            questions.append({"id": f"{base}_open", "video": name, "kind": kind, "form": "open",
                              "question": question, "options": [], "answer": answer})
            questions.append({"id": f"{base}_mc", "video": name, "kind": kind, "form": "mc",
                              "question": prompt, "options": shuffled, "answer": letter})
            turns.append((kind, [question, answer] if rng.random() < open_fraction else [prompt, letter]))
        groups = [([k], t) for k, t in turns] if one_question_per_entry else [([k for k, _ in turns],
                                                                              [x for _, t in turns for x in t])]
        for group_kinds, texts in groups:
            texts = ["<video>\n" + texts[0], *texts[1:]]
            conversations = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]
            suffix = f"_{group_kinds[0]}" if one_question_per_entry else ""
            annotations.append({"id": f"synth_{seed}_{v:04d}{suffix}", "video": name, "conversations": conversations,
                                "event": dataclasses.asdict(event), "num_frames": num_frames, "fps": fps})
    for name, items in (("annotations.json", annotations), ("questions.json", questions)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(items, f, indent=1)
    return os.path.join(out_dir, "annotations.json")


def train_and_eval_sets(out_dir: str, train_videos: int, eval_videos: int, *, kinds: Sequence[str],
                        forms: set[str], **video) -> tuple[str, str, int]:
    """A training set and a held-out set (the demo's): `train_videos` videos of seed 0 in `<out_dir>/videos_train`,
    annotated with one single-question sample per video and kind, in the question `forms` ("open", "mc" or
    both, half each); `eval_videos` videos of seed 1 in `<out_dir>/videos_eval`, their questions of `forms` in
    `<out_dir>/eval_questions.json`. `video`: `generate`'s video arguments. Returns (training annotations,
    eval questions file, number of eval questions)."""
    open_fraction = 1.0 if forms == {"open"} else 0.0 if forms == {"mc"} else 0.5
    train_ann = generate(os.path.join(out_dir, "videos_train"), train_videos, seed=0, kinds=kinds,
                         open_fraction=open_fraction, one_question_per_entry=True, **video)
    generate(os.path.join(out_dir, "videos_eval"), eval_videos, seed=1, kinds=kinds, **video)
    with open(os.path.join(out_dir, "videos_eval", "questions.json")) as f:
        questions = [q for q in json.load(f) if q["form"] in forms]
    eval_questions = os.path.join(out_dir, "eval_questions.json")
    with open(eval_questions, "w") as f:
        json.dump(questions, f, indent=1)
    return train_ann, eval_questions, len(questions)
