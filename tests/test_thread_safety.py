"""One `Lion` called from several threads at once: every answer equals the one a lone call gives.

Routes are bound per call (a context variable of the model), and the processor never changes its
tokenizers' settings, so concurrent calls with different tasks cannot see each other's state.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import make_tiny_lion
from PIL import Image

from lion_mllm.model.tasks import CAPTION_PROMPT, GROUNDING_TEMPLATE

COLOURS = [(200, 30, 30), (20, 160, 60), (40, 40, 220), (240, 200, 10)]


def picture(i: int) -> Image.Image:
    img = Image.new("RGB", (64 + 8 * i, 48 + 4 * i), COLOURS[i % len(COLOURS)])
    img.paste((255, 255, 255), (4 * i, 8, 20 + 4 * i, 30))
    return img


# (image, question, task, tags): both routes, batches of one and of two with mixed routes
CASES = [
    ([0], [CAPTION_PROMPT], ["caption"], ["red"]),
    ([1], [GROUNDING_TEMPLATE.format(phrase="the white square")], ["grounding"], ["green, square"]),
    ([2, 3], ["what colour is it?", GROUNDING_TEMPLATE.format(phrase="the square")], ["vqa", "grounding"], ["blue", "x"]),
    ([3, 0], [GROUNDING_TEMPLATE.format(phrase="it"), "is it red?"], ["grounding", "vqa"], ["yellow", "red, square"]),
]


@pytest.fixture(scope="module")
def lion():
    return make_tiny_lion(seed=9)


def run(lion, case: int, beams: int) -> list[str]:
    images, questions, tasks, tags = CASES[case]
    return lion.generate([picture(i) for i in images], questions, tasks, tags, num_beams=beams, max_new_tokens=6)


def test_concurrent_calls_with_mixed_tasks_equal_sequential_calls(lion):
    torch.set_num_threads(1)  # the hammering is about interleaving, not speed
    jobs = [(case, beams) for case in range(len(CASES)) for beams in (1, 2)]
    expected = {job: run(lion, *job) for job in jobs}
    routed = [r for r in expected.values()]
    assert len({tuple(r) for r in routed}) > 1  # the cases do answer differently
    start = threading.Barrier(4)

    def worker(offset: int) -> list[tuple[tuple[int, int], list[str]]]:
        start.wait()  # all four threads enter the model together
        order = jobs[offset:] + jobs[:offset]
        return [(job, run(lion, *job)) for job in order * 2]

    with ThreadPoolExecutor(4) as pool:
        results = [pair for part in pool.map(worker, range(4)) for pair in part]
    assert len(results) == 4 * 2 * len(jobs)
    wrong = [(job, got, expected[job]) for job, got in results if got != expected[job]]
    assert wrong == []


def test_routes_are_local_to_the_calling_thread(lion):
    model = lion.model
    seen: dict[str, object] = {}
    bound = threading.Event()
    checked = threading.Event()

    def other_thread() -> None:
        bound.wait(5)
        seen["other"] = model.route_state.route_ids  # the main thread's routes are not visible here
        with model.routing(torch.tensor([0])):
            seen["inside"] = model.route_state.route_ids.tolist()
        checked.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with model.routing(torch.tensor([1, 1])):
        bound.set()
        assert checked.wait(5)
        assert model.route_state.route_ids.tolist() == [1, 1]  # untouched by the other thread's block
    thread.join(5)
    assert seen == {"other": None, "inside": [0]}
    assert model.route_state.route_ids is None
    with pytest.raises(RuntimeError, match="no route set"):
        model.route_state.for_batch(1)


def test_processor_leaves_its_tokenizers_settings_alone(lion):
    processor = lion.processor
    before = (processor.tokenizer.truncation_side, processor.qformer_tokenizer.truncation_side)
    batch = processor([picture(0)], ["word " * 300], ["vqa"], ["red"], answers=["an answer " * 40])
    assert (processor.tokenizer.truncation_side, processor.qformer_tokenizer.truncation_side) == before
    assert batch["input_ids"].shape[1] == lion.config.language.max_text_length  # cut from the left
    assert batch["input_ids"][0, -1].item() == processor.tokenizer.eos_token_id
    assert batch["labels"].shape[1] == lion.config.language.max_output_text_length  # cut from the right
