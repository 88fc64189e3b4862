"""A linear probe for patch position with the scikit-learn API, and a batched torch solver.

    probe = PositionProbe(grid=(24, 24), target="index", solver="torch").fit(X_train, index_train)
    probe.score(X_test, index_test)            # accuracy
    probes = fit_layers([X_layer0, X_layer1, ...], index_train, grid=(24, 24))   # all layers in one solve

`y` is always the patch's raster index (row * cols + col); `target` decides what is predicted from
it. Classification targets are multinomial logistic regression with an L2 penalty, the objective
of scikit-learn's `LogisticRegression(C=C)`; `rowcol` is ridge regression of (row, col) with
`alpha = 1 / C`. Features are standardised with the training set's mean and std. Both solvers
minimise the same objective, so they agree up to convergence tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin

from probes.targets import check_target, distance, num_classes, target_values

SOLVERS = ("torch", "sklearn")


class PositionProbe(ClassifierMixin, BaseEstimator):
    """Predict a patch's position (`target`: index, row, col or rowcol) from its activation."""

    def __init__(self, grid: tuple[int, int] = (24, 24), *, target: str = "index", solver: str = "torch",
                 C: float = 1.0, max_iter: int = 500, tol: float = 1e-4, device: str = "cpu") -> None:
        self.grid = grid
        self.target = target
        self.solver = solver
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    # --- fitting ------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray) -> PositionProbe:
        """Learn from features X (n, D) and raster indices y (n,)."""
        self._check_params()
        if self.solver == "sklearn":
            self._fit_sklearn(np.asarray(X, dtype=np.float32), np.asarray(y))
        else:
            fitted = fit_layers([X], y, **self.get_params())[0]
            self.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
        return self

    def _check_params(self) -> None:
        check_target(self.target)
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if not self.C > 0:
            raise ValueError(f"C must be positive, got {self.C}")

    def _fit_sklearn(self, X: np.ndarray, y: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression, Ridge

        self.mean_, self.scale_ = _standardizer(X)
        Z = (X - self.mean_) / self.scale_
        values = target_values(y, self.target, self.grid)
        if self.target == "rowcol":
            model = Ridge(alpha=1 / self.C).fit(Z, values)
            self.coef_, self.intercept_, self.n_iter_ = model.coef_, model.intercept_, 0
            return
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol).fit(Z, values)
        self.classes_ = np.arange(num_classes(self.target, self.grid))
        # A training set that misses a class leaves it out of sklearn's model; give it -inf odds.
        self.coef_ = np.zeros((len(self.classes_), X.shape[1]), dtype=np.float32)
        self.intercept_ = np.full(len(self.classes_), -np.inf, dtype=np.float32)
        self.coef_[model.classes_] = model.coef_
        self.intercept_[model.classes_] = model.intercept_
        self.n_iter_ = int(np.max(model.n_iter_))

    # --- predicting ---------------------------------------------------------------------------
    def decision_function(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_
        return Z @ np.asarray(self.coef_, dtype=np.float32).T + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.target == "rowcol":
            raise AttributeError("the rowcol target is a regression; it has no class probabilities")
        return torch.softmax(torch.from_numpy(self.decision_function(X)), dim=-1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels, or for `rowcol` the (n, 2) nearest grid cell (row, col)."""
        scores = self.decision_function(X)
        if self.target == "rowcol":
            upper = np.array(self.grid) - 1
            return np.clip(np.rint(scores), 0, upper).astype(int)
        return scores.argmax(axis=-1)

    def score(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """Accuracy: the fraction of patches whose position (in the target's terms) is predicted exactly."""
        correct = patch_scores(self, X, y)["accuracy"]
        return float(np.average(correct, weights=sample_weight))


def patch_scores(probe: PositionProbe, X: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
    """Per patch: accuracy (0/1), top5 (0/1, NaN for rowcol) and Manhattan distance in patches."""
    predicted = probe.predict(X)
    off = distance(predicted, np.asarray(index), probe.target, probe.grid).astype(float)
    if probe.target == "rowcol":
        top5 = np.full(len(off), np.nan)
    else:
        scores = probe.decision_function(X)
        truth = target_values(np.asarray(index), probe.target, probe.grid)
        k = min(5, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top5 = (top == truth[:, None]).any(axis=1).astype(float)
    return {"accuracy": (off == 0).astype(float), "top5": top5, "manhattan": off}


# ------------------------------------------------------------------------------------------ torch
def _standardizer(X: np.ndarray | torch.Tensor) -> tuple:
    mean = X.mean(0)
    scale = X.std(0)
    scale[scale < 1e-8] = 1.0  # a constant feature stays 0 after centring
    return mean, scale


def fit_layers(
    layers: Sequence[np.ndarray],
    y: np.ndarray | Sequence[np.ndarray],
    *,
    grid: tuple[int, int],
    target: str = "index",
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-4,
    device: str = "cpu",
    solver: str = "torch",
) -> list[PositionProbe]:
    """Fit one probe per feature matrix in `layers` (each (n, D), same n) in a single batched torch solve.

    `y` is one array of raster indices for all layers, or one per layer (shuffled-label controls).
    Returns fitted `PositionProbe`s with `solver="torch"`, numpy attributes on the CPU.
    """
    check_target(target)
    if solver != "torch":
        return [PositionProbe(grid=grid, target=target, solver=solver, C=C, max_iter=max_iter, tol=tol,
                              device=device).fit(X, labels) for X, labels in zip(layers, _per_layer(y, len(layers)))]
    X = torch.stack([torch.as_tensor(np.asarray(layer), dtype=torch.float32) for layer in layers]).to(device)
    mean, scale = _standardizer(X.transpose(0, 1))
    X = (X - mean[:, None]) / scale[:, None]
    labels = np.stack([target_values(np.asarray(item), target, grid) for item in _per_layer(y, len(layers))])
    if target == "rowcol":
        coef, intercept = _ridge(X, torch.as_tensor(labels, dtype=torch.float32, device=device), alpha=1 / C)
        iterations = 0
    else:
        classes = num_classes(target, grid)
        coef, intercept, iterations = _multinomial(X, torch.as_tensor(labels, device=device), classes, C=C,
                                                   max_iter=max_iter, tol=tol)
    probes = []
    for layer in range(len(layers)):
        probe = PositionProbe(grid=grid, target=target, solver="torch", C=C, max_iter=max_iter, tol=tol, device=device)
        probe.mean_, probe.scale_ = mean[layer].cpu().numpy(), scale[layer].cpu().numpy()
        probe.coef_, probe.intercept_ = coef[layer].cpu().numpy(), intercept[layer].cpu().numpy()
        probe.n_iter_ = iterations
        if target != "rowcol":
            probe.classes_ = np.arange(classes)
        probes.append(probe)
    return probes


def _per_layer(y: np.ndarray | Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    if isinstance(y, np.ndarray) and y.ndim == 1:
        return [y] * count
    if len(y) != count:
        raise ValueError(f"got {len(y)} label arrays for {count} layers")
    return list(y)


def _multinomial(X: torch.Tensor, y: torch.Tensor, classes: int, *, C: float, max_iter: int,
                 tol: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L-BFGS on sum over layers of mean cross-entropy + ||W||^2 / (2 C n): sklearn's optimum, layer by layer."""
    layers, n, width = X.shape
    weight = torch.zeros(layers, width, classes, device=X.device, requires_grad=True)
    bias = torch.zeros(layers, 1, classes, device=X.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.baddbmm(bias, X, weight)
        loss = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="sum") / n
        loss = loss + (weight**2).sum() / (2 * C * n)
        loss.backward()
        return loss

    optimizer.step(objective)
    iterations = optimizer.state[weight].get("n_iter", max_iter)
    return weight.detach().transpose(1, 2), bias.detach()[:, 0], int(iterations)


def _ridge(X: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge per layer on centred data (the intercept is not penalised, as in sklearn)."""
    x_mean, y_mean = X.mean(1, keepdim=True), y.mean(1, keepdim=True)
    Xc, yc = (X - x_mean).double(), (y - y_mean).double()
    gram = Xc.transpose(1, 2) @ Xc + alpha * torch.eye(X.shape[2], device=X.device, dtype=torch.float64)
    coef = torch.linalg.solve(gram, Xc.transpose(1, 2) @ yc).float()  # (layers, D, 2)
    intercept = y_mean[:, 0] - (x_mean @ coef)[:, 0]
    return coef.transpose(1, 2), intercept
