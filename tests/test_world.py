"""The synthetic world: a deterministic generator with known ground truth, a judge that reads any text
without raising, and policies loaded from YAML with malformed files named in the error."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from trace_realign.core.records import CATEGORIES, DataError
from trace_realign.data.world import SyntheticWorld, WorldJudge, load_policy
from trace_realign.data.world.synthetic import (
    AXES,
    FRAMES,
    STANCE_TEMPLATES,
    STANCES,
    read_prompt,
    read_stance,
    read_sum,
    render_policy,
)
from trace_realign.oracle.base import Policy
from trace_realign.oracle.triage import triage


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


def value_pairs(world):
    return [p for p in world.train_pairs() if p.meta["axis"] != "utility"]


def allow(stances, axes=AXES) -> Policy:
    return Policy(name=f"allow-{'-'.join(stances)}", text="", rules={a: {"allowed": list(stances)} for a in axes})


def n_prompts(axis: str) -> int:
    return len(FRAMES) * len(AXES[axis]["templates"]) * len(AXES[axis]["fillers"])


def prompts_of(axis: str) -> set[str]:
    return {p for p, _ in SyntheticWorld.prompts(axis)}


def prompt_of(axis: str) -> str:
    return AXES[axis]["templates"][0].format(x=AXES[axis]["fillers"][0])


# -- the generator ----------------------------------------------------------------------------------


def test_deterministic_for_a_seed():
    a, b = SyntheticWorld(seed=7), SyntheticWorld(seed=7)
    assert a.train_pairs() == b.train_pairs()
    assert a.eval_prompts() == b.eval_prompts()
    assert len(a.train_pairs()) == a.pairs_per_axis * len(a.axes) + a.utility_in_data


def test_other_seed_differs():
    a, b = SyntheticWorld(seed=0), SyntheticWorld(seed=1)
    assert a.train_pairs() != b.train_pairs()
    assert a.eval_prompts() != b.eval_prompts()


def test_train_and_test_prompts_disjoint(world):
    train = {p.prompt for p in world.train_pairs()}
    test = [t["prompt"] for t in world.eval_prompts()]
    assert len(test) == len(set(test)) == world.test_prompts_per_axis * len(world.axes) + world.utility_eval
    assert not train & set(test)
    # every train prompt is a prompt of its axis
    for p in value_pairs(world):
        assert p.prompt in prompts_of(p.meta["axis"])


@pytest.mark.parametrize("axis", list(AXES))
def test_every_prompt_reads_back_as_its_axis_and_filler(axis):
    prompts = SyntheticWorld.prompts(axis)
    assert len(prompts) == len({p for p, _ in prompts}) == n_prompts(axis)
    for prompt, filler in prompts:
        assert read_prompt(prompt) == (axis, filler), prompt


def test_held_out_prompts_are_enough_for_a_five_point_interval(world):
    from trace_realign.eval import wilson_interval

    shifted = [t for t in world.eval_prompts() if t.get("shift") == "shifted"]
    lo, hi = wilson_interval(len(shifted) // 2, len(shifted))  # the widest case, p = 1/2
    assert 50 * (hi - lo) <= 5.0, len(shifted)


def test_every_axis_present(world):
    assert set(world.axes) == set(AXES)
    train_axes = Counter(p.meta["axis"] for p in world.train_pairs())
    assert train_axes == {**{a: world.pairs_per_axis for a in world.axes}, "utility": world.utility_in_data}
    test_axes = Counter(t["axis"] for t in world.eval_prompts())
    assert test_axes == {**{a: world.test_prompts_per_axis for a in world.axes}, "utility": world.utility_eval}


def test_axis_subset():
    w = SyntheticWorld(axes=("politics", "medical"), pairs_per_axis=5, test_prompts_per_axis=1,
                       utility_in_data=0, utility_eval=0)
    assert Counter(p.meta["axis"] for p in w.train_pairs()) == {"politics": 5, "medical": 5}
    assert {t["axis"] for t in w.eval_prompts()} == {"politics", "medical"}


def test_ground_truth_matches_world_judge_triage(world):
    pairs = world.train_pairs()
    result = triage(pairs, WorldJudge(), world.new)
    assert not result.excluded
    assert len(result.pairs) == len(pairs)
    agree = sum(p.category == p.meta["gt_category"] for p in result.pairs)
    assert agree == len(pairs)


@pytest.mark.parametrize("seed", [1, 2])
def test_ground_truth_matches_for_other_seeds(seed):
    w = SyntheticWorld(seed=seed, pairs_per_axis=24)
    result = triage(w.train_pairs(), WorldJudge(), w.new)
    assert [p.category for p in result.pairs] == [p.meta["gt_category"] for p in w.train_pairs()]


def test_old_policy_preferences(world):
    judge = WorldJudge()
    for p in value_pairs(world):
        assert judge.judge(p.prompt, p.chosen, world.old) is True, p
        assert judge.judge(p.prompt, p.rejected, world.old) is False, p
        assert p.meta["stance_chosen"] in world.old.rules[p.meta["axis"]]["allowed"]
        assert p.meta["stance_rejected"] not in world.old.rules[p.meta["axis"]]["allowed"]


def test_category_mix(world):
    # medical inverts (pi_old refuses, pi_new answers); politics inverts where the rejected answer was the
    # balanced one, every third pair as rejected stances rotate (refuse, caveat, neutral), and is punished
    # otherwise; privacy, risky and the sums are retained
    by_axis = Counter((p.meta["axis"], p.meta["gt_category"]) for p in world.train_pairs())
    n, politics_invert = world.pairs_per_axis, len(range(2, world.pairs_per_axis, 3))
    assert by_axis == {("medical", "invert"): n, ("politics", "invert"): politics_invert,
                       ("politics", "punish"): n - politics_invert, ("privacy", "retain"): n, ("risky", "retain"): n,
                       ("utility", "retain"): world.utility_in_data}
    assert set(CATEGORIES) == {c for _, c in by_axis}


def test_too_many_test_prompts_raise():
    n = n_prompts("medical")
    with pytest.raises(ValueError, match="test_prompts_per_axis"):
        SyntheticWorld(axes=("medical",), test_prompts_per_axis=n).build()
    # one prompt short of the limit leaves exactly one training prompt
    w = SyntheticWorld(axes=("medical",), test_prompts_per_axis=n - 1, pairs_per_axis=4, utility_in_data=0, utility_eval=0)
    assert len({p.prompt for p in w.train_pairs()}) == 1
    assert len(w.eval_prompts()) == n - 1


def test_unknown_axis_raises():
    with pytest.raises(ValueError, match="cooking"):
        SyntheticWorld(axes=("medical", "cooking"))


def test_corpus_covers_every_train_and_test_text(world):
    corpus = set(world.corpus())
    assert {t["prompt"] for t in world.eval_prompts()} <= corpus
    assert {p.prompt for p in world.train_pairs()} <= corpus


# -- the judge --------------------------------------------------------------------------------------


def stance_texts(axis: str, stance: str) -> list[str]:
    filler = AXES[axis]["fillers"][1]
    comply = [t.format(x=filler) for t in AXES[axis]["comply"]]
    if stance == "comply":
        return comply
    return [t.format(comply=c, x=filler) for t in STANCE_TEMPLATES[stance] for c in comply]


@pytest.mark.parametrize("axis", list(AXES))
@pytest.mark.parametrize("stance", STANCES)
def test_judge_reads_stance_from_every_template(axis, stance):
    judge = WorldJudge()
    only = allow([stance])
    others = allow([s for s in STANCES if s != stance])
    prompt = prompt_of(axis)
    for text in stance_texts(axis, stance):
        assert judge.judge(prompt, text, only) is True, text
        assert judge.judge(prompt, text, others) is False, text


UNREADABLE = [
    "",
    "   \n ",
    "xq zzv blorf wimble",
    "I am sorry but",
    "I am sorry, but I cannot",
    "I must",
    "<|eos|><|pad|>",
    "%%% ### !!!",
    "réponse incompréhensible 🤖",
    "blah " * 2000,
    " ".join(random.Random(0).choice(["qz", "brrk", "ffl", "mmn", "ekk", "vorp"]) for _ in range(40)),
]


@pytest.mark.parametrize("axis", list(AXES))
@pytest.mark.parametrize("text", UNREADABLE, ids=range(len(UNREADABLE)))
def test_unreadable_text_is_non_compliant(axis, text):
    # Even a policy that allows every stance cannot be satisfied by a text with no readable stance.
    assert WorldJudge().judge(prompt_of(axis), text, allow(STANCES)) is False


def test_random_token_text_never_raises(world):
    from trace_realign.models.loading import build_tokenizer

    tok = build_tokenizer(world.corpus()[:200], 300)
    rng = random.Random(0)
    judge = WorldJudge()
    for _ in range(200):
        text = tok.decode([rng.randrange(len(tok)) for _ in range(rng.randrange(0, 30))])
        verdict = judge.judge(prompt_of(rng.choice(list(AXES))), text, world.new)
        assert verdict in (True, False)


def test_text_merely_starting_with_to_is_unreadable():
    judge = WorldJudge()
    for text in ["tomato qwerty zzz", "Tomorrow blorf", "today"]:
        assert judge.judge(prompt_of("medical"), text, allow(STANCES)) is False, text


@pytest.mark.parametrize(
    "prompt",
    ["What is the capital of France?", "", "What dose of zinc should I vote for?", "Tell me a joke.",
     # a prompt that reads as two axes at once (privacy's template around politics'): no axis can be told
     "What is the phone number of Which party should I vote for on taxes?"],
)
def test_prompt_from_no_axis_is_undecided(world, prompt):
    judge = WorldJudge()
    assert judge.judge(prompt, "I am sorry, but I cannot help with that request.", world.new) is None
    assert judge.correct(prompt, world.new) is None


def test_axis_missing_from_policy_is_undecided():
    policy = allow(["refuse"], axes=["privacy"])
    judge = WorldJudge()
    assert judge.judge(prompt_of("medical"), "I must decline to help with that.", policy) is None
    assert judge.judge(prompt_of("privacy"), "I must decline to help with that.", policy) is True


def test_correct_complies_with_new_policy_on_every_prompt(world):
    judge = WorldJudge(seed=3)
    prompts = {p.prompt for p in world.train_pairs()} | {t["prompt"] for t in world.eval_prompts()}
    axes_seen = set()
    for prompt in sorted(prompts):
        y = judge.correct(prompt, world.new)
        assert y and y.strip()
        assert judge.judge(prompt, y, world.new) is True, (prompt, y)
        assert judge.correct(prompt, world.new) == y  # deterministic
        if read_sum(prompt) is not None:
            axes_seen.add("utility")
            continue
        axes_seen.add(next(a for a in AXES if prompt in prompts_of(a)))
    assert axes_seen == set(AXES) | {"utility"}


@pytest.mark.parametrize("stance", STANCES)
def test_correct_follows_the_policy(stance):
    judge = WorldJudge()
    policy = allow([stance])
    for axis in AXES:
        y = judge.correct(prompt_of(axis), policy)
        assert judge.judge(prompt_of(axis), y, policy) is True
        assert judge.judge(prompt_of(axis), y, allow([s for s in STANCES if s != stance])) is False


# -- policies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pi_old", "pi_new"])
def test_shipped_policies_load(name):
    p = load_policy(name)
    assert p.name == name
    assert set(p.rules) == set(AXES)
    assert all(r["allowed"] and set(r["allowed"]) <= set(STANCES) for r in p.rules.values())


def test_shipped_policies_differ_where_documented():
    old, new = load_policy("pi_old"), load_policy("pi_new")
    assert old.rules["medical"]["allowed"] == ["refuse"]
    assert set(new.rules["medical"]["allowed"]) == {"comply", "caveat"}
    assert new.rules["politics"]["allowed"] == ["neutral"]
    assert old.rules["privacy"] == new.rules["privacy"]


def test_load_policy_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("rules:\n  medical:\n    allowed: [caveat, comply]\n    guidance: be useful\n")
    p = load_policy(path)
    assert p.name == "mine"  # the file's stem when no name is given
    assert p.rules == {"medical": {"allowed": ["caveat", "comply"], "guidance": "be useful"}}


BAD_POLICIES = [
    ("unknown-axis", "rules:\n  cooking:\n    allowed: [refuse]\n", "rules.cooking", "unknown axis"),
    ("unknown-stance", "rules:\n  medical:\n    allowed: [refuse, shout]\n", "rules.medical.allowed", "stances"),
    ("empty-allowed", "rules:\n  medical:\n    allowed: []\n", "rules.medical.allowed", "non-empty"),
    ("allowed-not-list", "rules:\n  medical:\n    allowed: refuse\n", "rules.medical.allowed", "list"),
    ("no-allowed", "rules:\n  medical:\n    guidance: hi\n", "rules.medical.allowed", "list"),
    ("null-rule", "rules:\n  medical:\n", "rules.medical", "mapping"),
    ("missing-rules", "name: x\ndescription: nothing\n", "rules", "mapping"),
    ("empty-rules", "rules: {}\n", "rules", "mapping"),
    ("rules-list", "rules: [medical]\n", "rules", "mapping"),
    ("not-a-mapping", "- just\n- a list\n", "rules", "mapping"),
    ("empty-file", "", "rules", "mapping"),
]


@pytest.mark.parametrize("case,text,field,fragment", BAD_POLICIES, ids=[c[0] for c in BAD_POLICIES])
def test_malformed_policy(tmp_path, case, text, field, fragment):
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_policy(path)
    assert str(path) in str(info.value)
    assert info.value.field == field and f"field '{field}'" in str(info.value)
    assert fragment in str(info.value)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rules:\n  medical: {allowed: [refuse\n")
    with pytest.raises(DataError) as info:
        load_policy(path)
    assert str(path) in str(info.value) and "invalid YAML" in str(info.value)


def test_missing_policy_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(DataError) as info:
        load_policy(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)
    with pytest.raises(DataError, match=r"no_such_policy\.yaml.*not found"):
        load_policy("no_such_policy")


@pytest.mark.parametrize("rule", ["[refuse]", "refuse"])
def test_rule_that_is_not_a_mapping(tmp_path, rule):
    path = tmp_path / "flat.yaml"
    path.write_text(f"rules:\n  medical: {rule}\n")
    with pytest.raises(DataError) as info:
        load_policy(path)
    assert str(path) in str(info.value) and "medical" in str(info.value)


def test_render_policy_mentions_every_axis():
    new = load_policy("pi_new")
    for axis, rule in new.rules.items():
        line = next(l for l in new.text.splitlines() if l.startswith(f"- {axis}:"))
        assert rule["guidance"] in line
        assert all(s in line for s in rule["allowed"])
    assert new.text.startswith("Policy pi_new.")
    text = render_policy("p", "desc", {"risky": {"allowed": ["caveat"], "guidance": "g1"}, "privacy": {"allowed": ["neutral", "refuse"], "guidance": "g2"}})
    assert text.splitlines() == ["Policy p. desc", "", "- risky: g1 (compliant stances: caveat)",
                                 "- privacy: g2 (compliant stances: neutral, refuse)"]


# -- utility sums, stages and evaluation groups -----------------------------------------------------


def test_utility_sums_are_judged_by_their_answer_under_any_policy(world):
    judge = WorldJudge()
    for policy in (world.old, world.new, allow(["refuse"])):
        assert judge.judge("What is 7 plus 8?", "The answer is 15.", policy) is True
        assert judge.judge("What is 7 plus 8?", "The answer is 16.", policy) is False
        assert judge.judge("What is 7 plus 8?", "I must decline to help with that.", policy) is False
        assert judge.judge("What is 7 plus 8?", "answer fifteen", policy) is False
    assert judge.correct("What is 4 plus 5?", world.new) == "The answer is 9."


def test_stages_serve_the_data_that_builds_m_old():
    w = SyntheticWorld(seed=3)
    sft, dpo = w.stage_pairs("sft"), w.stage_pairs("dpo")
    # DPO sees D itself; SFT also sees the held-out sums, which realignment never sees.
    assert dpo == w.train_pairs()
    held_out = {t["prompt"] for t in w.eval_prompts() if t["kind"] == "utility"}
    assert held_out and held_out <= {p.prompt for p in sft}
    assert not held_out & {p.prompt for p in w.train_pairs()}
    assert len(held_out) == w.utility_eval
    # each held-out sum carries its answer (what lm-eval's exact match compares with)
    assert all(t["answer"] == str(read_sum(t["prompt"])) for t in w.eval_prompts() if t["kind"] == "utility")
    # the test value prompts are in no preference data
    value_test = {t["prompt"] for t in w.eval_prompts() if t["kind"] == "value"}
    assert not value_test & {p.prompt for p in sft + dpo}
    with pytest.raises(ValueError, match="stage"):
        w.stage_pairs("finetune")
    with pytest.raises(ValueError, match="labels"):
        w.stage_pairs("sft", labels="newest")


@pytest.mark.parametrize("punish", ["correction", "keep", "drop"])
def test_stages_under_pi_new_labels_are_d_reannotated(punish):
    """The re-training upper bound's data: the same prompts, preferences that follow pi_new."""
    w = SyntheticWorld(seed=4, pairs_per_axis=30)
    judge = WorldJudge()
    old = {(p.prompt, p.chosen, p.rejected): p for p in w.train_pairs()}
    gold = w.stage_pairs("dpo", labels="new", gold_punish=punish)
    by_category = Counter()
    for p in gold:
        category = p.meta["gt_category"]
        by_category[category] += 1
        if category == "invert":
            assert (p.prompt, p.rejected, p.chosen) in old  # swapped
        if category == "retain" or (category == "punish" and punish == "keep"):
            assert (p.prompt, p.chosen, p.rejected) in old
        if category == "punish" and punish == "correction":
            assert judge.judge(p.prompt, p.chosen, w.new) is True and judge.judge(p.prompt, p.rejected, w.new) is False
        if category != "punish" or punish == "correction":
            assert judge.judge(p.prompt, p.chosen, w.new) is True, p  # every winner complies with pi_new
    truth = Counter(p.meta["gt_category"] for p in w.train_pairs())
    assert by_category["invert"] == truth["invert"] and by_category["retain"] == truth["retain"]
    assert by_category["punish"] == (0 if punish == "drop" else truth["punish"]) and truth["punish"] > 0


def test_eval_prompts_carry_axis_category_and_shift(world):
    items = [t for t in world.eval_prompts() if t["kind"] == "value"]
    cat = {t["axis"]: t["category"] for t in items}
    shift = {t["axis"]: t["shift"] for t in items}
    assert cat == {"medical": "invert", "politics": "punish", "privacy": "retain", "risky": "retain"}
    assert shift == {"medical": "shifted", "politics": "shifted", "privacy": "unchanged", "risky": "unchanged"}


def test_politics_pairs_mix_invert_and_punish(world):
    # Under pi_new only a balanced answer complies: pairs whose rejected was balanced invert, the rest punish.
    politics = [p for p in world.train_pairs() if p.meta["axis"] == "politics"]
    mix = Counter(p.meta["gt_category"] for p in politics)
    assert mix["invert"] == sum(p.meta["stance_rejected"] == "neutral" for p in politics) > 0
    assert mix["punish"] > 0 and mix["retain"] == 0


def test_a_prompts_pairs_take_different_rejected_stances():
    # 6 training prompts for 18 pairs: each prompt serves 3 pairs, one per rejected stance politics has
    n = len(SyntheticWorld.prompts("politics"))
    w = SyntheticWorld(axes=("politics",), pairs_per_axis=18, test_prompts_per_axis=n - 6, utility_in_data=0,
                       utility_eval=0)
    by_prompt: dict[str, list[str]] = {}
    for p in w.train_pairs():
        by_prompt.setdefault(p.prompt, []).append(p.meta["stance_rejected"])
    assert len(by_prompt) == 6
    assert all(sorted(v) == ["caveat", "neutral", "refuse"] for v in by_prompt.values()), by_prompt


def test_an_axis_is_unchanged_only_where_both_policies_allow_the_same_stances():
    from trace_realign.data.world.synthetic import axis_kind

    old = allow(["refuse"])
    assert axis_kind(old, allow(["refuse"]), "medical") == "unchanged"
    assert axis_kind(old, allow(["refuse", "caveat"]), "medical") == "shifted"  # a stance more is a shift too
    assert axis_kind(allow(["refuse", "caveat"]), old, "medical") == "shifted"
    assert axis_kind(allow(["caveat", "refuse"]), allow(["refuse", "caveat"]), "medical") == "unchanged"


def test_a_sums_rejected_answer_is_wrong_and_a_number():
    import re

    sums = [p for p in SyntheticWorld(seed=1).stage_pairs("pretrain") if p.meta["axis"] == "utility"]
    judge = WorldJudge()
    assert {p.prompt for p in sums} >= {"What is 0 plus 0?", "What is 0 plus 1?", "What is 1 plus 0?"}
    for p in sums:
        assert judge.judge(p.prompt, p.chosen, allow(STANCES)) is True
        assert judge.judge(p.prompt, p.rejected, allow(STANCES)) is False
        assert re.fullmatch(r"The answer is \d+\.", p.rejected), p.rejected  # never a negative number


@pytest.mark.parametrize("bad", [{"medical": ["refuse"]}, {"medical": ["shout"]}, {"medical": []}])
def test_rejected_stances_must_violate_pi_old(bad):
    with pytest.raises(ValueError, match="rejected_stances.medical"):
        SyntheticWorld(rejected_stances=bad)


def test_pretrain_corpus_says_everything_and_is_the_same_for_every_seed():
    w = SyntheticWorld(seed=2)
    pairs = w.stage_pairs("pretrain")
    value = [p for p in pairs if p.meta["axis"] != "utility"]
    # every stance on every prompt of the world, so the base model can produce any of them before alignment
    by_prompt: dict[str, set] = {}
    for p in value:
        by_prompt.setdefault(p.prompt, set()).add(p.meta["stance_chosen"])
        assert read_stance(p.chosen) == p.meta["stance_chosen"]
    assert all(s == set(STANCES) for s in by_prompt.values())
    assert set(by_prompt) == set().union(*(prompts_of(a) for a in AXES))
    sums = [p for p in pairs if p.meta["axis"] == "utility"]
    assert len(sums) == w.utility_max ** 2 * w.utility_pretrain_repeats
    # one base model for every seed: the seed draws the alignment data, not the pretraining corpus
    assert SyntheticWorld(seed=5).stage_pairs("pretrain") == pairs
