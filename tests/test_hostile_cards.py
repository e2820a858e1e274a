"""Malformed and hostile run cards and weights: every problem is one ArtifactError line naming the file and field."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from damage import reseal
from safetensors.torch import load_file, save_file

from rlbackdoor.cli import main
from rlbackdoor.errors import ArtifactError
from rlbackdoor.multiagent import cleanse
from rlbackdoor.specs import ExperimentSpec, parse
from rlbackdoor.training.artifacts import load_policy, read_card
from rlbackdoor.training.card_schema import rebuild_policy
from rlbackdoor.training.loop import train

TINY = {"n_steps": 32, "batch_size": 64, "n_epochs": 1, "policy_kwargs": {"net_arch": [16]}}
Edit = Callable[[dict[str, Any]], Any]


def tiny_run(root: Path, env: str, poisoning: str | None) -> Path:
    data = {"name": "hostile", "env": env, "poisoning": poisoning, "algo": "ppo", "timesteps": 128, "n_envs": 2}
    return train(parse(ExperimentSpec, {**data, "hyperparams": TINY}, "test"), root, wandb_mode="disabled")


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs") / "cartpole", "CartPole-v1", None)


@pytest.fixture(scope="module")
def rps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs") / "rps", "rlbd/TrojanRPS-v0", "inner")


def copy_of(run: Path, tmp_path: Path, edit: Edit | None = None) -> Path:
    """A copy of ``run`` whose card ``edit`` changed in place."""
    out = Path(shutil.copytree(run, tmp_path / run.name))
    if edit is not None:
        card = json.loads((out / "card.json").read_text())
        edit(card)
        (out / "card.json").write_text(json.dumps(card))
    return out


def kwargs(**values: Any) -> Edit:
    return lambda card: card["policy"]["kwargs"].update(values)


def obs(**values: Any) -> Edit:
    return lambda card: card["policy"]["observation_space"].update(values)


def act(**values: Any) -> Edit:
    return lambda card: card["policy"]["action_space"].update(values)


def policy(**values: Any) -> Edit:
    return lambda card: card["policy"].update(values)


def drop(block: str, key: str) -> Edit:
    return lambda card: card["policy"][block].pop(key)


POLICY_CASES = [
    (policy(kwargs="abc"), r"policy\.kwargs: 'abc' is not a mapping"),
    (policy(kwargs=[1, 2]), r"policy\.kwargs: \[1, 2\] is not a mapping"),
    (policy(**{"class": ["ActorCriticPolicy"]}), r"policy\.class: \['ActorCriticPolicy'\] is not a string"),
    (kwargs(net_arch=[-3]), r"policy\.kwargs\.net_arch\.0: -3 is not a layer size in 1\.\.65536"),
    (kwargs(net_arch=[16, 0]), r"policy\.kwargs\.net_arch\.1: 0 is not a layer size"),
    (kwargs(net_arch=[1.5]), r"policy\.kwargs\.net_arch\.0: 1\.5 is not a layer size"),
    (kwargs(net_arch=[True]), r"policy\.kwargs\.net_arch\.0: True is not a layer size"),
    (kwargs(net_arch=[10**12]), r"policy\.kwargs\.net_arch\.0: 1000000000000 is not a layer size"),
    (kwargs(net_arch=[8] * 65), r"policy\.kwargs\.net_arch: 65 entries, expected 0 to 64"),
    (kwargs(net_arch=[60000, 60000]), r"policy: about 7,200,\d+,\d+ weights, more than the cap"),
    (kwargs(net_arch="16"), r"policy\.kwargs\.net_arch: '16' is not a list"),
    (kwargs(net_arch={"pi": [-1], "vf": [8]}), r"policy\.kwargs\.net_arch\.pi\.0: -1 is not a layer size"),
    (kwargs(net_arch={"pi": [8], "qf": [8]}), r"policy\.kwargs\.net_arch\.qf: not a network of net_arch"),
    (kwargs(activation_fn="flatten"), r"policy\.kwargs\.activation_fn: unknown class 'flatten'"),
    (kwargs(features_extractor_class="relu"), r"policy\.kwargs\.features_extractor_class: unknown class 'relu'"),
    (kwargs(features_extractor_kwargs=[1]), r"policy\.kwargs\.features_extractor_kwargs: \[1\] is not a mapping"),
    (
        kwargs(features_extractor_class="nature_cnn", features_extractor_kwargs={"features_dim": 10**9}),
        r"policy\.kwargs\.features_extractor_kwargs\.features_dim: 1000000000 is not an integer in 1\.\.65536",
    ),
    (kwargs(optimizer_kwargs="eps"), r"policy\.kwargs\.optimizer_kwargs: 'eps' is not a mapping"),
    (kwargs(log_std_init=10**400), r"policy\.kwargs\.log_std_init: .* is not a finite number"),
    (kwargs(ortho_init="yes"), r"policy\.kwargs\.ortho_init: 'yes' is not true or false"),
    (kwargs(foo=1), r"policy\.kwargs\.foo: not a parameter of ActorCriticPolicy"),
    (kwargs(**{"bad\nkey": 1}), r"policy\.kwargs\.'bad\\nkey': not a parameter"),
    (policy(**{"class": "DQNPolicy"}), r"policy\.kwargs\.\w+: not a parameter of DQNPolicy"),
    (kwargs(features_extractor_class="nature_cnn"), r"policy: SB3 cannot build the ActorCriticPolicy it describes"),
    (policy(observation_space=[4]), r"policy\.observation_space: \[4\] is not a mapping"),
    (drop("observation_space", "type"), r"policy\.observation_space\.type: missing"),
    (obs(type="Graph"), r"policy\.observation_space\.type: unknown space type 'Graph'"),
    (obs(shape="4"), r"policy\.observation_space\.shape: '4' is not a list"),
    (obs(shape=[[4]]), r"policy\.observation_space\.shape\.0: \[4\] is not a size"),
    (obs(shape=[-4]), r"policy\.observation_space\.shape\.0: -4 is not a size in 1\.\.134217728"),
    (obs(shape=[10**30]), r"policy\.observation_space\.shape\.0: 1000000000000000000000000000000 is not a size in"),
    (obs(shape=[2**14] * 3), r"policy\.observation_space\.shape: 4,398,046,511,104 elements, more than the cap"),
    (obs(low=[0.0, 1.0]), r"policy\.observation_space\.low: 2 entries for a shape of 4 elements"),
    (obs(high=[1.0, 1.0, 1.0, "big"]), r"policy\.observation_space\.high\.3: 'big' is not a number"),
    (obs(dtype="floaty"), r"policy\.observation_space\.dtype: 'floaty' is not a numpy bool, integer or float dtype"),
    (obs(dtype="O"), r"policy\.observation_space\.dtype: 'O' is not a numpy"),
    (obs(dtype=["f4"]), r"policy\.observation_space\.dtype: \['f4'\] is not a string"),
    (drop("observation_space", "dtype"), r"policy\.observation_space\.dtype: missing"),
    (obs(dtype="uint8", low=[0] * 4, high=[300] * 4), r"policy\.observation_space\.high\.0: 300 is not a uint8 value"),
    (obs(low=[1.0] * 4, high=[0.0] * 4), r"policy\.observation_space: Box all low values must be less"),
    (policy(observation_space={"type": "Dict", "spaces": [1]}), r"policy\.observation_space\.spaces: \[1\] is not"),
    (policy(observation_space={"type": "Dict", "spaces": {"a": 3}}), r"policy\.observation_space\.spaces\.a: 3 is not"),
    (
        policy(observation_space={"type": "Dict", "spaces": {"a": {"type": "Dict", "spaces": {}}}}),
        r"policy\.observation_space\.spaces\.a: a nested Dict space",
    ),
    (
        lambda card: card["policy"].update(
            observation_space={"type": "Dict", "spaces": {"a": card["policy"]["observation_space"]}}
        ),
        r"policy\.kwargs\.features_extractor_class: FlattenExtractor does not take a Dict observation space",
    ),
    (act(n=10**7), r"policy: about [\d,]+ weights, more than the cap"),
    (act(n=10**30), r"policy\.action_space\.n: 1000000000000000000000000000000 is not a size in 1\.\.134217728"),
    (act(n=0), r"policy\.action_space\.n: 0 is not a size in 1\.\.134217728"),
    (act(n=-1), r"policy\.action_space\.n: -1 is not a size in 1\.\.134217728"),
    (act(n="2"), r"policy\.action_space\.n: '2' is not a size"),
    (act(start=10**30), r"policy\.action_space\.start: 1000000000000000000000000000000 is not an integer in"),
    (drop("action_space", "start"), r"policy\.action_space\.start: missing"),
    (
        policy(action_space={"type": "MultiDiscrete", "nvec": [2, -1], "start": [0, 0]}),
        r"policy\.action_space\.nvec\.1: -1",
    ),
    (
        policy(action_space={"type": "MultiDiscrete", "nvec": [2, 10**30], "start": [0, 0]}),
        r"policy\.action_space\.nvec\.1: 1000000000000000000000000000000 is not a size in 1\.\.134217728",
    ),
    (
        policy(action_space={"type": "MultiDiscrete", "nvec": [2], "start": []}),
        r"policy\.action_space\.start: 0 entries",
    ),
    (policy(action_space={"type": "MultiBinary", "n": -2}), r"policy\.action_space\.n: -2 is not a size"),
    (
        policy(action_space={"type": "MultiBinary", "n": 10**30}),
        r"policy\.action_space\.n: 1000000000000000000000000000000 is not a size",
    ),
    (
        policy(action_space={"type": "MultiBinary", "n": [2**27] * 3}),
        r"policy\.action_space\.n: 2,417,851,639,229,258,349,412,352 elements, more than the cap",
    ),
    (
        policy(action_space={"type": "Dict", "spaces": {"a": {"type": "Discrete", "n": 2, "start": 0}}}),
        r"policy\.action_space: ActorCriticPolicy cannot act in a Dict space",
    ),
]


@pytest.mark.parametrize(("edit", "message"), POLICY_CASES)
def test_a_malformed_policy_entry_is_one_line_naming_card_and_field(
    cartpole: Path, tmp_path: Path, edit: Edit, message: str
) -> None:
    run = copy_of(cartpole, tmp_path, edit)
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(run / 'card.json'))}: {message}") as info:
        load_policy(run)
    assert "\n" not in str(info.value) and str(info.value).endswith(
        "; retrain the run or restore an undamaged copy, or fix card.json"
    )


@pytest.mark.parametrize("command", [["eval"], ["detect", "-d", "probe"], ["sanitize"]])
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (kwargs(net_arch=[-3]), "policy.kwargs.net_arch.0: -3 is not a layer size"),
        (act(n=10**30), "policy.action_space.n: 1000000000000000000000000000000 is not a size"),
    ],
)
def test_the_cli_reports_a_hostile_policy_entry_in_one_line(
    cartpole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], edit: Edit, message: str
) -> None:
    run = copy_of(cartpole, tmp_path, edit)
    assert main([command[0], str(run), *command[1:], "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"card.json: {message}" in err


@pytest.mark.parametrize("command", [["eval"], ["detect", "-d", "probe"], ["sanitize"]])
def test_a_card_whose_observations_fit_its_weights_but_not_its_env_is_one_line(
    cartpole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    run = copy_of(cartpole, tmp_path, obs(shape=[2, 2]))  # still 4 inputs: the weights load
    assert main([command[0], str(run), *command[1:], "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "expects observations of shape (2, 2) but the env gives (4,)" in err


def test_rebuild_policy_names_its_source_and_the_round_trip_still_works(cartpole: Path) -> None:
    description = read_card(cartpole)["policy"]
    assert rebuild_policy(description).state_dict().keys() == load_policy(cartpole)[0].state_dict().keys()
    with pytest.raises(ArtifactError, match=r"^zoo/a/card\.json: policy\.kwargs\.net_arch\.0: -3"):
        rebuild_policy({**description, "kwargs": {"net_arch": [-3]}}, "zoo/a/card.json")


def retype(name: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], Any]:
    return lambda state: state.update({name: state[name].to(dtype)})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (retype("action_net.bias", torch.float8_e4m3fn), r"action_net\.bias is \[2\] torch\.float8_e4m3fn"),
        (retype("action_net.bias", torch.float64), r"action_net\.bias is \[2\] torch\.float64, the policy needs"),
        (retype("action_net.bias", torch.int64), r"action_net\.bias is \[2\] torch\.int64"),
        (lambda state: state.update({"action_net.bias": torch.zeros(3)}), r"action_net\.bias is \[3\] torch\.float32"),
        (lambda state: state.pop("action_net.bias"), r"no tensor action_net\.bias; 1 missing, 0 unexpected"),
        (lambda state: state.update({"evil\nname": torch.zeros(1)}), r"unexpected tensor 'evil\\nname'"),
    ],
)
def test_weights_that_do_not_fit_the_card_are_one_line_errors(
    cartpole: Path, tmp_path: Path, damage: Callable[[dict[str, torch.Tensor]], Any], message: str
) -> None:
    run = copy_of(cartpole, tmp_path)
    state = load_file(run / "policy.safetensors")
    damage(state)
    save_file(state, run / "policy.safetensors")
    reseal(run)
    with pytest.raises(
        ArtifactError, match=rf"policy\.safetensors: weights do not fit the policy in card\.json \({message}"
    ) as info:
        load_policy(run)
    assert "\n" not in str(info.value)


def nested_json(run: Path) -> None:
    (run / "card.json").write_text("[" * 100_000)


def huge_card(run: Path) -> None:
    with (run / "card.json").open("r+b") as fh:
        fh.truncate(17 * 2**20)  # sparse: cheap to write, 17 MiB to read


def card_is_a_directory(run: Path) -> None:
    (run / "card.json").unlink()
    (run / "card.json").mkdir()


def wrappers_not_a_list(run: Path) -> None:
    (run / "card.json").write_text(json.dumps({**read_card(run), "attack": {"base_wrappers": 5}}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (nested_json, r"card\.json: unreadable \(maximum recursion depth"),
        (huge_card, r"card\.json: larger than the 16 MiB a card may hold; retrain"),
        (card_is_a_directory, r"card\.json: not a regular file"),
        (wrappers_not_a_list, r"card\.json: attack\.base_wrappers: 5 is not a list"),
    ],
)
def test_unreadable_cards_are_one_line_errors(cartpole: Path, tmp_path: Path, damage: Any, message: str) -> None:
    run = copy_of(cartpole, tmp_path)
    damage(run)
    with pytest.raises(ArtifactError, match=message) as info:
        load_policy(run)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------- rlbd cleanse
def write_card(text: str) -> Callable[[Path], Any]:
    return lambda run: (run / "card.json").write_text(text)


def edit_card(edit: Edit) -> Callable[[Path], Any]:
    def apply(run: Path) -> None:
        card = json.loads((run / "card.json").read_text())
        edit(card)
        (run / "card.json").write_text(json.dumps(card))

    return apply


CLEANSE_CASES = [
    (edit_card(lambda c: c.pop("env")), r"card\.json: env: missing"),
    (edit_card(lambda c: c.pop("config")), r"card\.json: config: missing"),
    (edit_card(lambda c: c.pop("poisoning")), r"card\.json: poisoning: missing"),
    (edit_card(lambda c: c.pop("policy")), r"card\.json: policy: missing"),
    (edit_card(lambda c: c.update(env=3)), r"card\.json: env: 3 is not a string"),
    (edit_card(lambda c: c.update(config=[1])), r"card\.json: config: \[1\] is not a mapping"),
    (edit_card(lambda c: c.update(config=None)), r"card\.json: config: None is not a mapping"),
    (edit_card(lambda c: c.update(poisoning=3)), r"card\.json: poisoning: 3 is not a string or null"),
    (edit_card(lambda c: c.update(policy="x")), r"card\.json: policy: 'x' is not a mapping"),
    (edit_card(kwargs(net_arch=[-3])), r"card\.json: policy\.kwargs\.net_arch\.0: -3 is not a layer size"),
    (
        edit_card(obs(shape=[6, 6])),
        r"card\.json: policy: observes shape \(6, 6\) and acts in Discrete\(3\), but agent 'player_0' of "
        r"rlbd/TrojanRPS-v0 observes shape \(36,\)",
    ),
    (edit_card(act(start=5)), r"acts in Discrete\(3, start=5\), but agent 'player_0'"),
    (write_card("[1, 2]"), r"card\.json: expected a JSON object"),
    (write_card("null"), r"card\.json: expected a JSON object"),
    (write_card("{not json"), r"card\.json: unreadable"),
    (card_is_a_directory, r"card\.json: not a regular file"),
]


@pytest.mark.parametrize(("damage", "message"), CLEANSE_CASES)
def test_rlbd_cleanse_reports_a_malformed_card_in_one_line_before_training(
    rps: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    damage: Callable[[Path], Any],
    message: str,
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a prober trained before every card was checked")

    monkeypatch.setattr(cleanse, "policy_cleanse", refuse)
    bad = copy_of(rps, tmp_path)
    damage(bad)
    assert main(["cleanse", str(rps), str(bad), "--timesteps", "8", "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith(f"rlbd: error: {bad}") and re.search(message, err)
    with pytest.raises(ArtifactError, match=message):
        cleanse.cleanse_runs([bad])


def test_rlbd_cleanse_refuses_a_run_given_twice_before_training(
    rps: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cleanse, "policy_cleanse", lambda *args, **kwargs: pytest.fail("a prober trained"))
    again = rps.parent / ".." / rps.parent.name / rps.name
    assert main(["cleanse", str(rps), str(again), "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rlbd: error: {again}: given twice (also as {rps}); name each run once"


def test_a_card_that_names_no_env_is_one_line_naming_its_path(
    cartpole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlbackdoor.evaluation.envs import run_env

    run = copy_of(cartpole, tmp_path, lambda card: card.update(env=3))
    message = f"{run / 'card.json'}: neither 'attack' nor 'env' names the env of the run; retrain or fix the card"
    with pytest.raises(ArtifactError) as info:
        run_env(read_card(run), run / "card.json")
    assert str(info.value) == message
    for argv in (["sanitize", str(run)], ["detect", str(run), "-d", "probe"]):
        assert main([*argv, "--wandb-mode", "disabled"]) == 2
        assert capsys.readouterr().err.strip() == f"rlbd: error: {message}"


def test_cleanse_runs_reads_env_and_poisoning_from_well_formed_cards(
    rps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = cleanse.CleanseResult(0.5, 0.1, -0.4, (0, 0, 0))
    monkeypatch.setattr(cleanse, "policy_cleanse", lambda env, victim, **options: found)
    clean = copy_of(rps, tmp_path, lambda card: card.update(poisoning=None))
    report = cleanse.cleanse_runs([rps, clean], k=3)
    assert report["env"] == "rlbd/TrojanRPS-v0" and [row["backdoored"] for row in report["rows"]] == [True, False]


def test_a_card_error_keeps_its_class_in_a_batch_context() -> None:
    from rlbackdoor.errors import in_context
    from rlbackdoor.training.card_schema import CardError

    err = in_context(CardError("x/card.json: policy", "missing"), "zoo z: agent 1")
    assert type(err) is CardError and str(err).startswith("zoo z: agent 1: x/card.json: policy: missing; retrain")
