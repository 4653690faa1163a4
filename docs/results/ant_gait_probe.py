"""Can the ant of our AntDir / AntVel envs run at the MAML paper's speeds? An open-loop gait
search answers from below (docs/results/locomotion.md, "What speed the env allows: open-loop
gaits"):

``python docs/results/ant_gait_probe.py --config configs/ant-dir.yaml`` (and ant-vel.yaml)

For each task (AntDir: the two directions; AntVel: goal speeds at the midpoints of six equal
bins of U[0, 3]) the cross-entropy method searches the 25 numbers of a periodic open-loop
gait, the same for every episode and blind to the state,

    a_j(t) = clip(b_j + A_j sin(2 pi f t + phi_j), -1, 1),   j = 1..8,  t = step x dt,

scoring each candidate by its mean return over ``--search-seeds`` reset seeds on the env's
own batched path (``make_batch_env``: the env's reward, termination and reset noise, the
config's ``env-kwargs`` and horizon). Of the ``--restarts`` searches per task, the one whose
best gait scores higher on other reset seeds is kept, and that gait is run again through
the plain gymnasium env (``gym.make``, an independent path) on ``--eval-episodes`` fresh
reset seeds: its return, episode length and speed (ant_speeds.py's: torso qvel[0] over the
running steps) are printed as a table beside the MAML paper's figures, with the search
curves as a PNG.

A gait found this way bounds what the env allows from below: the best policy that sees the
state does at least as well. The CEM loop is a few lines of numpy (no library needed for
it); the physics and rewards are the library's.
"""

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import binom_rl.envs  # noqa: F401  (registers the ids)
from binom_rl.config import Config, ConfigError, load_yaml
from binom_rl.envs.batch import make_batch_env

sys.path.insert(0, str(Path(__file__).parent))
from ant_speeds import qvel_x_index  # noqa: E402

ACT = 8  # Ant's actuators
NUM_PARAMS = 3 * ACT + 1  # bias, amplitude, phase per actuator; one frequency
FREQ_RANGE = (0.25, 5.0)  # Hz
# the MAML paper's test returns (Finn et al. 2017; DESIGN.md): MAML after 1 step, oracle
PAPER = {"direction": (499.2, 524.8), "velocity": (96.7, 107.9)}
SEED_STRIDE = 1_000  # reset seeds of one generation: gen * SEED_STRIDE + k


def gait_actions(params: np.ndarray, step: int, dt: float) -> np.ndarray:
    """[P, 8] actions of P gaits at env step ``step`` (params [P, 25])."""
    bias, amp, phase = params[:, :ACT], params[:, ACT : 2 * ACT], params[:, 2 * ACT : 3 * ACT]
    freq = params[:, 3 * ACT : 3 * ACT + 1]
    return np.clip(bias + amp * np.sin(2 * np.pi * freq * step * dt + phase), -1.0, 1.0)


def legal(params: np.ndarray) -> np.ndarray:
    """Amplitudes >= 0, frequency within FREQ_RANGE (a copy)."""
    params = params.copy()
    params[:, ACT : 2 * ACT] = np.abs(params[:, ACT : 2 * ACT])
    params[:, 3 * ACT] = np.clip(np.abs(params[:, 3 * ACT]), *FREQ_RANGE)
    return params


def env_timing(cfg: Config) -> tuple[float, int]:
    """The env's seconds per step and the horizon (the config's, else the registered one)."""
    env = gym.make(cfg.env_name, **cfg.env_kwargs)
    dt, horizon = env.unwrapped.dt, cfg.max_episode_steps or env.spec.max_episode_steps
    env.close()
    return dt, horizon


def score(cfg: Config, task: dict, params: np.ndarray, seeds: list[int]) -> np.ndarray:
    """[P] mean return of each gait over ``seeds`` (one batched env per seed and gait)."""
    p, s = len(params), len(seeds)
    dt, horizon = env_timing(cfg)
    batch = make_batch_env(cfg.env_name, [task] * (p * s), cfg.env_kwargs)
    try:
        batch.reset([seed for seed in seeds for _ in range(p)])
        tiled = np.tile(params, (s, 1))
        total, alive = np.zeros(p * s), np.ones(p * s, dtype=bool)
        for step in range(horizon):
            _, reward, terminated = batch.step(gait_actions(tiled, step, dt))
            total += reward * alive
            alive &= ~terminated
            if not alive.any():
                break
    finally:
        batch.close()
    return total.reshape(s, p).mean(0)


def search(cfg: Config, task: dict, args, rng: np.random.Generator, bar: tqdm):
    """CEM: (best gait [25], mean elite return per generation)."""
    mean = np.concatenate([np.zeros(ACT), np.full(ACT, 0.5), np.zeros(ACT), [2.0]])
    std = np.concatenate([np.full(ACT, 0.3), np.full(ACT, 0.3), np.full(ACT, np.pi), [1.0]])
    elite_n = max(2, args.population // 8)
    curve, best, best_return = [], mean, -np.inf
    for gen in range(args.generations):
        population = legal(mean + std * rng.standard_normal((args.population, NUM_PARAMS)))
        seeds = [gen * SEED_STRIDE + k for k in range(args.search_seeds)]
        returns = score(cfg, task, population, seeds)
        elite = population[np.argsort(returns)[-elite_n:]]
        # a small floor keeps the search from collapsing before the last generation
        mean, std = elite.mean(0), elite.std(0) + 0.02
        curve.append(float(np.sort(returns)[-elite_n:].mean()))
        if returns.max() > best_return:
            best, best_return = population[np.argmax(returns)], float(returns.max())
        bar.update(1)
    return best, np.array(curve)


def replay(cfg: Config, task: dict, gait: np.ndarray, seeds: list[int]):
    """Return, length and mean qvel[0] of each episode of ``gait`` on the gymnasium env."""
    dt, horizon = env_timing(cfg)
    env = gym.make(cfg.env_name, max_episode_steps=horizon, **cfg.env_kwargs)
    vx_index, out = qvel_x_index(cfg), []
    for seed in seeds:
        env.unwrapped.reset_task(task)
        obs, _ = env.reset(seed=seed)
        total, length, vx = 0.0, 0, []
        for step in range(horizon):
            obs, reward, terminated, truncated, _ = env.step(gait_actions(gait[None], step, dt)[0])
            total, length = total + reward, length + 1
            vx.append(obs[vx_index])
            if terminated or truncated:
                break
        out.append((total, length, float(np.mean(vx))))
    env.close()
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="an AntDir or AntVel config")
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--search-seeds", type=int, default=4, help="reset seeds per score")
    parser.add_argument("--restarts", type=int, default=2, help="CEM runs per task, best kept")
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="PNG (default: no plot)")
    parser.add_argument("--save", type=Path, help=".npz of the tasks' best gaits")
    args = parser.parse_args()
    try:
        cfg = Config.from_dict(load_yaml(args.config))
    except ConfigError as err:
        parser.error(str(err))
    if "AntDir" in cfg.env_name:
        key, tasks = "direction", [{"direction": 1.0}, {"direction": -1.0}]
    elif "AntVel" in cfg.env_name:
        key, tasks = "velocity", [{"velocity": 0.25 + 0.5 * i} for i in range(6)]
    else:
        parser.error(f"{args.config}: env {cfg.env_name} is not AntDir or AntVel")
    for name in ("generations", "population", "search_seeds", "restarts", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for path in (args.plot, args.save):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{path.parent} is not a directory")

    rng = np.random.default_rng(args.seed)
    horizon = env_timing(cfg)[1]
    # reset seeds disjoint from every search seed (those are < generations x 1000): the
    # restarts are compared on select_seeds, the chosen gait is replayed on eval_seeds
    select_seeds = [10**6 + k for k in range(args.search_seeds)]
    eval_seeds = [10**7 + k for k in range(args.eval_episodes)]
    rows, curves, gaits = [], [], []
    start = time.time()
    with tqdm(total=len(tasks) * args.restarts * args.generations, unit="gen") as bar:
        for task in tasks:
            found = [search(cfg, task, args, rng, bar) for _ in range(args.restarts)]
            finals = [score(cfg, task, g[None], select_seeds)[0] for g, _ in found]
            gait, curve = found[int(np.argmax(finals))]
            episodes = replay(cfg, task, gait, eval_seeds)
            rows.append((task[key], gait, episodes))
            curves.append([c for _, c in found])
            gaits.append(gait)
    print(f"{args.config}: {time.time() - start:.0f} s, {args.restarts} x {args.generations} "
          f"generations of {args.population} per task, {args.eval_episodes} replayed "
          "episodes")  # fmt: skip
    print(f"| {key} | return | episode length | speed (m/s) | best episode: return, speed "
          "| episodes of 200 steps | gait frequency (Hz) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for goal, gait, ep in rows:
        se = ep[:, 0].std(ddof=1) / np.sqrt(len(ep)) if len(ep) > 1 else float("nan")
        best = ep[np.argmax(ep[:, 0])]
        print(f"| {goal:g} | {ep[:, 0].mean():.1f} +- {se:.1f} | {ep[:, 1].mean():.1f} "
              f"| {ep[:, 2].mean():.2f} | {best[0]:.1f}, {best[2]:.2f} "
              f"| {int((ep[:, 1] == horizon).sum())} of {len(ep)} "
              f"| {gait[3 * ACT]:.2f} |")  # fmt: skip
    overall = np.mean([ep[:, 0].mean() for _, _, ep in rows])
    maml, oracle = PAPER[key]
    print(f"mean over the tasks: {overall:.1f} (MAML paper: MAML after one step {maml}, "
          f"oracle {oracle})")  # fmt: skip
    if args.save:
        np.savez(args.save, goals=[g for g, _, _ in rows], gaits=np.stack(gaits))
        print(f"wrote {args.save}")
    if args.plot:
        plot(cfg, key, rows, curves, args.plot)
        print(f"wrote {args.plot}")


def plot(cfg: Config, key: str, rows, curves, out: Path) -> None:
    """Search curves per task, and the replayed gaits' speeds and returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(rows)))
    for (goal, _, _), runs, colour in zip(rows, curves, colours, strict=True):
        for i, curve in enumerate(runs):
            axes[0].plot(curve, color=colour, alpha=0.9 if i == 0 else 0.5,
                         label=f"{key} {goal:g}" if i == 0 else None)  # fmt: skip
    axes[0].set(xlabel="CEM generation", ylabel="mean elite return",
                title="search (each restart a line)")  # fmt: skip
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    goals = [g for g, _, _ in rows]
    speeds = [ep[:, 2].mean() for _, _, ep in rows]
    returns = [ep[:, 0].mean() for _, _, ep in rows]
    axes[1].bar(range(len(goals)), speeds, color=colours)
    for i, r in enumerate(returns):
        axes[1].annotate(f"return {r:.0f}", (i, speeds[i]), ha="center",
                         va="bottom" if speeds[i] >= 0 else "top", fontsize=8)  # fmt: skip
    if key == "velocity":
        axes[1].plot(range(len(goals)), goals, "k_", ms=20, label="goal speed")
        axes[1].legend(fontsize=8)
    axes[1].set_xticks(range(len(goals)), [f"{g:g}" for g in goals])
    axes[1].set(xlabel=key, ylabel="mean torso x-velocity (m/s)",
                title="best gait, replayed on the gymnasium env")  # fmt: skip
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"{cfg.env_name} {cfg.env_kwargs}: open-loop gaits found by CEM")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
