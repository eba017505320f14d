"""runtime/images.py against transformers 5.24's Idefics3ImageProcessorPil and load_image, pixel for pixel."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from smolvlm_edge.runtime import images as rt
from smolvlm_edge.runtime.errors import BundleError, ImageError

transformers = pytest.importorskip("transformers")
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil  # noqa: E402

# Tolerance 0: every resize runs in Pillow on the same uint8 images and the float math uses the
# reference's dtypes and operation order (float64 rescale -> float32, float32 normalize), so the
# pixels are bit-identical. Any difference at all means a step diverged.
ATOL = 0.0

GEOMETRIES = {  # name: (size longest_edge, max_image_size longest_edge)
    "256m": (1024, 512),  # SmolVLM-256M/500M tile size; longest edge kept small so tests stay quick
    "2.2b": (768, 384),
}


def _reference(geometry="256m", resample=1):
    size, tile = GEOMETRIES[geometry]
    return Idefics3ImageProcessorPil(
        size={"longest_edge": size}, max_image_size={"longest_edge": tile}, resample=resample
    )


def _ours(reference):
    config = rt.ImageConfig.from_dict(reference.to_dict())
    return rt.ImageProcessor(config)


def _picture(width, height, seed=0):
    """An RGB image with gradients (so resampling matters) and noise (so every pixel differs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.integers(-40, 40, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _in_mode(image, mode):
    """The picture converted to `mode`, with real alpha / transparency where the mode has it."""
    if mode == "RGBA" or mode == "LA":
        alpha = Image.linear_gradient("L").resize(image.size)
        out = image.convert(mode[:-1])
        out.putalpha(alpha)
        return out
    if mode == "P+transparency":
        out = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        out.info["transparency"] = 5
        return out
    if mode == "I;16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16)
        return Image.fromarray(gray * 257)  # full 16-bit range
    if mode == "F":
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.float32) * 1.5)
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    return image.convert(mode)


# (width, height, mode): tall, wide, tiny, exact tile, exact multiples, odd sizes, larger than `size`.
CASES = [
    (600, 400, "RGB"),
    (300, 1100, "RGB"),
    (7, 5, "RGB"),
    (512, 512, "RGB"),
    (1024, 512, "RGB"),
    (2048, 90, "RGB"),
    (333, 777, "L"),
    (250, 181, "LA"),
    (401, 299, "P"),
    (320, 240, "P+transparency"),
    (1500, 901, "RGBA"),
    (641, 479, "CMYK"),
    (201, 349, "I;16"),
    (123, 456, "1"),
    (90, 61, "I"),
    (55, 77, "F"),
]


def _compare(ours, theirs):
    """Assert every output of our processor equals the reference's BatchFeature."""
    ref_pixels = np.asarray(theirs["pixel_values"])
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref_pixels.shape
    diff = np.abs(ours.pixel_values - ref_pixels).max(initial=0.0)
    assert diff <= ATOL, f"max abs diff {diff}"
    assert ours.pixel_attention_mask.dtype == np.bool_
    np.testing.assert_array_equal(ours.pixel_attention_mask, np.asarray(theirs["pixel_attention_mask"]).astype(bool))
    assert ours.rows == [list(r) for r in theirs["rows"]]
    assert ours.cols == [list(c) for c in theirs["cols"]]


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
@pytest.mark.parametrize("width,height,mode", CASES, ids=[f"{w}x{h}-{m}" for w, h, m in CASES])
def test_single_image_matches_transformers(width, height, mode, split):
    image = _in_mode(_picture(width, height, seed=width), mode)
    reference = _reference()
    theirs = reference(images=[[image]], do_image_splitting=split, return_row_col_info=True)
    _compare(_ours(reference)([[image]], do_image_splitting=split), theirs)


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_batch_of_two_prompts_with_different_image_counts(split):
    prompts = [
        [_picture(600, 400, 1), _in_mode(_picture(120, 700, 2), "RGBA")],
        [_in_mode(_picture(90, 60, 3), "L")],
    ]
    reference = _reference()
    theirs = reference(images=prompts, do_image_splitting=split, return_row_col_info=True)
    ours = _ours(reference)(prompts, do_image_splitting=split)
    _compare(ours, theirs)
    # The second prompt's missing frames are padding: all zero, masked out.
    n_real = ours.pixel_attention_mask[1].any(axis=(1, 2)).sum()
    assert not ours.pixel_values[1, n_real:].any() and not ours.pixel_attention_mask[1, n_real:].any()


def test_prompt_without_images_is_padded_like_transformers():
    prompts = [[], [_picture(700, 300, 4), _picture(50, 80, 5)]]
    reference = _reference()
    theirs = reference(images=prompts, return_row_col_info=True)
    _compare(_ours(reference)(prompts), theirs)


def test_no_images_at_all_gives_empty_arrays():
    out = _ours(_reference())([[], []])
    assert out.pixel_values.shape == (2, 0, 3, 512, 512) and out.pixel_attention_mask.shape == (2, 0, 512, 512)
    assert out.rows == [[], []] and out.cols == [[], []]


@pytest.mark.parametrize("width,height", [(1000, 700), (333, 900), (384, 384), (5, 9)])
def test_smolvlm_2_2b_geometry(width, height):
    image = _picture(width, height, seed=height)
    reference = _reference("2.2b")
    theirs = reference(images=[[image]], return_row_col_info=True)
    _compare(_ours(reference)([[image]]), theirs)


def test_resample_filter_comes_from_the_config():
    image = _picture(900, 500, seed=7)
    reference = _reference(resample=3)  # BICUBIC
    theirs = reference(images=[[image]], return_row_col_info=True)
    _compare(_ours(reference)([[image]]), theirs)


@pytest.mark.parametrize("settings", [
    dict(image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276]),  # CLIP's: a different one per channel
    dict(rescale_factor=1 / 127.5, image_mean=[1.0, 1.0, 1.0], image_std=[1.0, 1.0, 1.0]),
    dict(do_normalize=False),
    dict(do_rescale=False, do_normalize=False),
], ids=["channel-means", "rescale", "no-normalize", "raw"])
def test_rescale_and_normalize_settings_match_transformers(settings):
    """Our per-byte table (runtime.images: one lookup per pixel) gives the reference's float steps' bits."""
    image = _picture(640, 480, seed=9)
    size, tile = GEOMETRIES["256m"]
    reference = Idefics3ImageProcessorPil(size={"longest_edge": size}, max_image_size={"longest_edge": tile}, **settings)
    for split in (False, True):
        theirs = reference(images=[[image]], do_image_splitting=split, return_row_col_info=True)
        _compare(_ours(reference)([[image]], do_image_splitting=split), theirs)


def test_config_splitting_default_is_used_when_not_overridden():
    image = _picture(900, 500, seed=8)
    reference = Idefics3ImageProcessorPil(
        size={"longest_edge": 1024}, max_image_size={"longest_edge": 512}, do_image_splitting=False
    )
    theirs = reference(images=[[image]], return_row_col_info=True)
    ours = _ours(reference)([[image]])
    assert ours.rows == [[0]]
    _compare(ours, theirs)


# ---------------------------------------------------------------- loading


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


SAVED = [  # mode, file suffix: what each format can hold
    ("RGB", "png"),
    ("L", "png"),
    ("LA", "png"),
    ("P", "png"),
    ("P+transparency", "png"),  # tRNS chunk: a P->RGB convert keeps it as an RGB key colour
    ("RGBA", "png"),
    ("I;16", "png"),
    ("1", "png"),
    ("CMYK", "jpg"),
    ("F", "tiff"),
]


@pytest.mark.parametrize("mode,suffix", SAVED, ids=[m for m, _ in SAVED])
def test_load_from_path_matches_transformers_end_to_end(tmp_path, mode, suffix):
    path = _save(_in_mode(_picture(130, 90, seed=3), mode), tmp_path / f"image.{suffix}")
    ours, theirs = rt.load_image(path), hf_load_image(str(path))
    assert ours.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert ours.info.get("transparency") == theirs.info.get("transparency")
    reference = _reference()
    _compare(_ours(reference)([[ours]]), reference(images=[[theirs]], return_row_col_info=True))


def test_load_from_bytes_and_pil_image(tmp_path):
    image = _in_mode(_picture(64, 48, seed=9), "RGBA")
    path = _save(image, tmp_path / "a.png")
    expected = np.asarray(hf_load_image(str(path)))
    np.testing.assert_array_equal(np.asarray(rt.load_image(path.read_bytes())), expected)
    np.testing.assert_array_equal(np.asarray(rt.load_image(str(path))), expected)
    np.testing.assert_array_equal(np.asarray(rt.load_image(image)), np.asarray(hf_load_image(image)))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_like_transformers(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_picture(40, 24, seed=orientation), tmp_path / "rotated.jpg", exif=exif, quality=95)
    ours, theirs = rt.load_image(path), hf_load_image(str(path))
    assert ours.size == theirs.size == ((40, 24) if orientation == 3 else (24, 40))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


# ---------------------------------------------------------------- errors


def _assert_image_error(source, needle):
    with pytest.raises(ImageError) as info:
        rt.load_image(source)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "missing.png"
    assert "not found" in _assert_image_error(path, str(path))


def test_directory(tmp_path):
    assert "directory" in _assert_image_error(tmp_path, str(tmp_path))


def test_corrupt_data(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all")
    _assert_image_error(path, str(path))
    _assert_image_error(b"this is not an image at all", "27 bytes")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_file(tmp_path, fmt):
    full = _save(_picture(200, 150, seed=11), tmp_path / f"full.{fmt}")
    data = full.read_bytes()
    path = tmp_path / f"truncated.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    _assert_image_error(path, str(path))


def test_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _save(_picture(30, 20), tmp_path / "big.png")
    monkeypatch.setattr(rt, "MAX_IMAGE_PIXELS", 599)
    assert "too large" in _assert_image_error(path, str(path))


@pytest.mark.parametrize("pil_limit", [400, 200], ids=["pil-warning", "pil-error"])
def test_pil_decompression_bomb_guard_is_wrapped(tmp_path, monkeypatch, pil_limit):
    # 600 pixels: above 400 PIL only warns, above 2 * 200 it raises; both must become ImageError.
    path = _save(_picture(30, 20), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    assert "too large" in _assert_image_error(path, str(path))


def test_zero_size_image():
    _assert_image_error(Image.new("RGB", (0, 4)), "zero size")
    with pytest.raises(ImageError, match="zero size"):
        _ours(_reference())([[Image.new("RGB", (5, 0))]])


def test_processor_rejects_non_images():
    with pytest.raises(ImageError, match="load_image"):
        _ours(_reference())([["photo.jpg"]])


# ---------------------------------------------------------------- configuration

SMOLVLM_256M_PREPROCESSOR = {  # as the SmolVLM-256M-Instruct checkpoint ships it
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 512},
    "processor_class": "Idefics3Processor",
    "resample": 1,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048},
}


def test_config_from_flat_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SMOLVLM_256M_PREPROCESSOR))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))  # not nested: ignored
    config = rt.ImageConfig.from_dir(tmp_path)
    assert (config.longest_edge, config.tile_size, config.resample) == (2048, 512, 1)
    assert config.rescale_factor == 0.00392156862745098 and config.image_mean == (0.5, 0.5, 0.5)


def test_config_nested_processor_config_wins_like_transformers(tmp_path):
    nested = dict(SMOLVLM_256M_PREPROCESSOR, max_image_size={"longest_edge": 384}, do_image_splitting=False)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 81, "image_processor": nested}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SMOLVLM_256M_PREPROCESSOR))
    config = rt.ImageConfig.from_dir(tmp_path)
    assert config.tile_size == 384 and config.do_image_splitting is False
    assert rt.ImageProcessor.from_dir(tmp_path).config == config


def test_config_written_by_transformers_round_trips(tmp_path):
    reference = _reference("2.2b", resample=3)
    reference.save_pretrained(tmp_path)
    image = _picture(500, 800, seed=12)
    theirs = reference(images=[[image]], return_row_col_info=True)
    _compare(rt.ImageProcessor.from_dir(tmp_path)([[image]]), theirs)


def test_config_missing_or_broken(tmp_path):
    with pytest.raises(BundleError, match="preprocessor_config.json"):
        rt.ImageConfig.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(BundleError, match="preprocessor_config.json"):
        rt.ImageConfig.from_dir(tmp_path)


def test_runtime_module_imports_neither_torch_nor_transformers():
    code = "import sys, smolvlm_edge.runtime.images; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("src,size", [((512, 512), (2048, 2048)), ((2048, 2048), (512, 512)), ((640, 480), (2048, 1536)),
                                      ((1999, 1001), (777, 1333)), ((3000, 400), (2048, 273))])
def test_resizing_bands_in_threads_gives_pillows_pixels(src, size):
    """resize_bands (one Pillow call per band, each in a thread) equals one RGB resize bit for bit, up and down,
    with scales that are not powers of two, for each filter the configs use."""
    image = _picture(*src, seed=src[0])
    assert src[0] * src[1] + size[0] * size[1] >= rt._BANDS_IN_THREADS_PIXELS  # the threaded path runs
    for resample in (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
        want = np.asarray(image.resize(size, resample=resample))
        np.testing.assert_array_equal(np.asarray(rt.resize_bands(image, size, resample)), want)


@pytest.mark.parametrize("src,sizes", [((512, 512), [(2048, 2048), (512, 512)]),
                                       ((640, 480), [(2048, 1536), (2048, 1536), (512, 512)]),
                                       ((1999, 1001), [(1456, 729), (1820, 1092)])])
def test_a_chain_of_resizes_in_band_threads_gives_pillows_pixels(src, sizes):
    """resize_chain (each band through every resize in its own thread) equals one RGB resize after another."""
    image = _picture(*src, seed=src[1])
    for resample in (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC):
        want = image
        for size in sizes:
            want = want.resize(size, resample=resample)
        np.testing.assert_array_equal(np.asarray(rt.resize_chain(image, sizes, resample)), np.asarray(want))


@pytest.mark.parametrize("src,sizes", [((512, 512), [(2048, 2048), (512, 512)]), ((800, 600), [(2048, 1536), (512, 512)]),
                                       ((600, 800), [(1536, 2048), (512, 512)]), ((1000, 333), [(2048, 682), (512, 512)]),
                                       ((640, 480), [(2048, 1536), (2048, 1536), (512, 512)]),
                                       ((1664, 660), [(2048, 812), (1024, 1024)])])
def test_column_strips_give_pillows_pixels(src, sizes):
    """The frame chains SmolVLM's processor makes (longest edge 2048, then a 512 frame or tiles) run in column
    strips, and every filter gives Pillow's pixels, whatever the number of strips."""
    image = _picture(*src, seed=src[0] + 1)
    for resample in (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR,
                     Image.Resampling.HAMMING, Image.Resampling.BOX):
        want = image
        for size in sizes:
            want = want.resize(size, resample=resample)
        for strips in (2, 3, 4):
            assert rt.column_strips_are_exact(image.size, sizes, resample, strips)
            np.testing.assert_array_equal(np.asarray(rt._in_column_strips(image, sizes, resample, strips)), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(rt.resize_chain(image, sizes, resample)), np.asarray(want))


def test_column_strips_are_refused_where_they_could_differ():
    """Width scales that are not short binary fractions (a strip's box edges would round), Pillow 13's
    vertical-first resizes (the height loses far more rows than the width columns), and NEAREST."""
    lanczos = Image.Resampling.LANCZOS
    assert not rt.column_strips_are_exact((700, 700), [(1536, 1536), (512, 512)], lanczos, 2)  # 700/1536, 3
    assert not rt.column_strips_are_exact((1024, 1024), [(512, 2048), (256, 256)], lanczos, 2)  # 1792 rows vs 256 columns
    assert not rt.column_strips_are_exact((512, 512), [(2048, 2048)], Image.Resampling.NEAREST, 2)
    image = _picture(1024, 1024, seed=9)  # the refused vertical-first chain still gives Pillow's pixels (in bands)
    want = image.resize((512, 2048), resample=lanczos).resize((256, 256), resample=lanczos)
    np.testing.assert_array_equal(np.asarray(rt.resize_chain(image, [(512, 2048), (256, 256)], lanczos)), np.asarray(want))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_band_threads_work_in_a_forked_child():
    """A child forked after the parent used the band threads makes its own (the parent's are not there)."""
    import multiprocessing

    image = _picture(1200, 900, seed=3)
    want = np.asarray(image.resize((400, 300), resample=Image.Resampling.LANCZOS))
    rt.resize_bands(image, (1400, 1000), Image.Resampling.LANCZOS)  # the parent's pool exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_resized_in_child, (image,)).get(timeout=60)
    np.testing.assert_array_equal(got, want)


def _resized_in_child(image):
    return np.asarray(rt.resize_bands(image, (400, 300), Image.Resampling.LANCZOS))
