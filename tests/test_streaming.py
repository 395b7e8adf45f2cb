"""A video file streamed into the model: frames decode in background threads and are handed out first to last
(`stream_video`), the processor turns them into chunks of inputs (`video_chunks`) whose pixels are the plain call's,
and the model encodes chunk by chunk (`encode_video_chunks`) into the state that encoding the whole video gives."""

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import prompt, tiny_model
from media_helpers import assert_same_video, counted_decoding_processes, write_x264

from vamba_hf import stream_video, video_decode_vamba, video_seek_vamba, video_vamba
from vamba_hf.tiny import build_tiny_processor
from vamba_hf.video_vamba import VideoSampling, load_video

NO_RESIZE = VideoSampling(video_shortest_edge=None, video_longest_edge=None)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_x264(tmp_path_factory.mktemp("stream") / "gops.mp4", num_frames=60, gop=6)


# -- frames as they decode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(num_frames=24, decode_workers=1), dict(num_frames=24, decode_workers=3),
                                     dict(num_frames=5, decode_workers=2), dict(fps=2.0, start_time=1.0),
                                     dict(num_frames=24, decode_workers=3, decode_processes=True)])
def test_a_stream_gives_the_frames_of_one_pass(video_file, options):
    expected = load_video(video_file, NO_RESIZE, decoder="sequential", **options)
    with stream_video(video_file, NO_RESIZE, decoder="seek", **options) as stream:
        assert stream.count == len(expected.frames)
        first = stream.frames(3)
        assert all(np.array_equal(a, b) for a, b in zip(first, expected.frames[:3]))
        assert_same_video(stream.video(), expected)


def test_the_first_frames_are_handed_out_while_later_ones_still_decode(video_file, monkeypatch):
    later_rows_may_decode = threading.Event()
    write = video_seek_vamba.RowWriter.write

    def held_back(writer, row, time, frame):  # the decoding threads stop at row 8
        if row >= 8:
            assert later_rows_may_decode.wait(timeout=60)
        write(writer, row, time, frame)

    expected = load_video(video_file, NO_RESIZE, num_frames=30, decoder="sequential")
    monkeypatch.setattr(video_seek_vamba.RowWriter, "write", held_back)
    stream = stream_video(video_file, NO_RESIZE, num_frames=30, decoder="seek", decode_workers=2)
    try:
        first = stream.frames(8)  # returns although rows 8.. are not decoded yet
        assert stream._writer.ready == 8
        assert all(np.array_equal(a, b) for a, b in zip(first, expected.frames[:8]))
    finally:
        later_rows_may_decode.set()
    assert_same_video(stream.video(), expected)


def test_a_stream_whose_index_turns_out_wrong_is_decoded_in_one_pass(video_file, monkeypatch):
    expected = load_video(video_file, NO_RESIZE, num_frames=12, decoder="sequential")
    packet_index = video_decode_vamba.packet_index
    monkeypatch.setattr(video_decode_vamba, "packet_index", lambda *args: replace(  # every packet one tick late
        packet_index(*args), pts=[value + 1 for value in packet_index(*args).pts]))
    passes = []
    decode_plan = video_decode_vamba._decode_plan
    monkeypatch.setattr(video_decode_vamba, "_decode_plan", lambda *args: passes.append(True) or decode_plan(*args))
    with stream_video(video_file, NO_RESIZE, num_frames=12, decoder="seek", decode_workers=2) as stream:
        assert_same_video(stream.video(), expected)
    assert passes == [True]


def test_frames_handed_out_before_a_fallback_that_samples_others_are_an_error(video_file):
    stream = stream_video(video_file, NO_RESIZE, num_frames=12, decoder="seek", decode_workers=2)
    stream.frames(4)
    other = load_video(video_file, NO_RESIZE, num_frames=13, decoder="sequential")
    stream._one_pass = lambda: other
    with pytest.raises(ValueError, match="4 frames of this video were handed out.*decoder='sequential'"):
        stream._decode_in_one_pass()


def test_closing_a_stream_stops_its_threads(video_file):
    before = threading.active_count()
    stream = stream_video(video_file, NO_RESIZE, num_frames=60, decoder="seek", decode_workers=3)
    stream.frames(2)
    stream.close()
    assert stream._writer.closed
    for _ in range(100):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= before


def test_closing_a_stream_ends_its_decoding_processes(video_file, monkeypatch):
    started = counted_decoding_processes(monkeypatch)
    stream = stream_video(video_file, NO_RESIZE, num_frames=60, decoder="seek", decode_workers=3,
                          decode_processes=True)
    first = stream.frames(2)
    stream.close()
    assert stream._writer.closed and 1 <= len(started) <= 3  # a worker not started by then starts none
    assert all(entry.process.poll() is not None for entry in started)  # ended (killed or done), none left behind
    expected = load_video(video_file, NO_RESIZE, num_frames=60, decoder="sequential")
    assert all(np.array_equal(a, b) for a, b in zip(first, expected.frames[:2]))


def test_frames_given_as_arrays_are_a_complete_stream():
    frames = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    stream = video_vamba.FrameStream.of(video_vamba.to_video_frames(frames))
    assert stream.count == 4 and len(stream.frames(10)) == 4


# -- the processor's chunks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.mark.parametrize("chunk_frames", [2, 6, 64])
def test_chunks_hold_the_pixels_of_the_plain_call(processor, video_file, chunk_frames):
    options = dict(num_frames=21, video_longest_edge=None, video_shortest_edge=None)  # odd: the last frame drops
    whole = processor(text="<|vision_start|><|vision_end|>", videos=video_file, return_tensors="pt",
                      return_metadata=True, **options)
    chunks = list(processor.video_chunks(video_file, chunk_frames=chunk_frames, decoder="seek", decode_workers=2,
                                         **options))
    assert torch.equal(torch.cat([c["pixel_values_videos"] for c in chunks]), whole["pixel_values_videos"])
    t, h, w = whole["video_grid_thw"][0].tolist()
    grids = torch.cat([c["video_grid_thw"] for c in chunks])
    assert grids[:, 0].sum() == t and (grids[:, 1:] == torch.tensor([h, w])).all()
    assert all(grid[0] * 2 == chunk_frames for grid in grids[:-1])
    assert [c["remaining_frames"] for c in chunks] == [20 - sum(int(g[0]) * 2 for g in grids[: i + 1])
                                                       for i in range(len(chunks))]
    stamps = [stamp for c in chunks for stamp in c["video_metadata"][0]["timestamps"]]
    assert stamps == whole["video_metadata"][0]["timestamps"][:20]


def test_chunks_of_frames_given_as_an_array(processor):
    frames = np.random.default_rng(0).integers(0, 255, (6, 48, 64, 3), dtype=np.uint8)
    whole = processor(text="<|vision_start|><|vision_end|>", videos=frames, return_tensors="pt")
    chunks = list(processor.video_chunks(frames, chunk_frames=4))
    assert [c["video_grid_thw"][0, 0].item() for c in chunks] == [2, 1]
    assert torch.equal(torch.cat([c["pixel_values_videos"] for c in chunks]), whole["pixel_values_videos"])


@pytest.mark.parametrize("call, message", [
    (dict(chunk_frames=3), "chunk_frames=3 is not valid"),
    (dict(chunk_frames=0), "chunk_frames=0 is not valid"),
    (dict(padding=True), "unknown option.*padding"),
    (dict(videos_kwargs={"nums_frames": 4}), "unknown option.*nums_frames"),
    (dict(return_tensors="np"), "returns torch tensors"),
])
def test_chunk_options_are_checked(processor, video_file, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        list(processor.video_chunks(video_file, **call))


def test_a_video_of_one_frame_gives_no_chunk_but_an_error(processor):
    with pytest.raises(ValueError, match="at least 2 frames"):
        list(processor.video_chunks(np.zeros((1, 48, 64, 3), dtype=np.uint8)))


# -- encoding chunk by chunk ------------------------------------------------------------------------------------------


def question_logits(model, state):
    return model(input_ids=prompt(4, 5, seed=3)[None], video_state=state).logits


def test_encoding_the_chunks_equals_encoding_the_whole_video(processor, video_file):
    model = tiny_model(cross_attn_use_position_embeddings=True, cross_attn_use_layer_norm=True)
    options = dict(num_frames=20, video_longest_edge=None, video_shortest_edge=None)
    whole = processor(text="<|vision_start|><|vision_end|>", videos=video_file, return_tensors="pt", **options)
    reference = model.encode_video(whole["pixel_values_videos"], whole["video_grid_thw"])
    state = model.encode_video_chunks(processor.video_chunks(video_file, chunk_frames=6, **options))
    assert state.length == reference.length and torch.equal(state.grid_thw, reference.grid_thw)
    assert len(state.sampling) == 4  # one record per chunk: 6 + 6 + 6 + 2 frames
    # Room for the whole video was reserved at the first chunk: the K/V never moved.
    assert state.keys[0].buffer.shape[2] == reference.length
    for name, tensor in reference.tensors().items():
        torch.testing.assert_close(state.tensors()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(question_logits(model, state), question_logits(model, reference), rtol=1e-5,
                               atol=1e-5)
    question = prompt(4, 5, seed=3)[None]
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(input_ids=question, video_state=state, **greedy),
                       model.generate(input_ids=question, video_state=reference, **greedy))


def test_chunks_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="got no chunk"):
        model.encode_video_chunks([])
    pixels = torch.randn(16, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match="unknown key.*attention_mask"):
        model.encode_video_chunks([{"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[1, 4, 4]]),
                                    "attention_mask": torch.ones(1, 3)}])


def test_chunks_of_a_video_served_over_http(processor, video_file):
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(video_file.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{video_file.name}"
        options = dict(num_frames=10, video_longest_edge=None, video_shortest_edge=None)
        whole = processor(text="<|vision_start|><|vision_end|>", videos=video_file, return_tensors="pt", **options)
        chunks = list(processor.video_chunks(url, chunk_frames=4, **options))  # decoded first, then chunked
    finally:
        server.shutdown()
    assert [c["video_grid_thw"][0, 0].item() for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["pixel_values_videos"] for c in chunks]), whole["pixel_values_videos"])
