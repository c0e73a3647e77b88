"""Task-identity inference for Dynamic ConPET: pure torch routing algorithms, free of Trainer and callbacks.

Why a router decides the result. With one expert per task and top-1 routing, a test sample is right only if it is
routed to its own task and its expert then picks the right class, so class-incremental accuracy = task-id accuracy
x within-task accuracy (Kim et al., "A Theoretical Study on Solving Continual Learning", NeurIPS 2022). Predicting
the task is out-of-distribution detection for each task's distribution; the scores here are the classic OOD scores
turned into task scores ``s[B, T]`` (higher = more likely), and a route is ``s.topk(k).indices``.

- Prototype (Mahalanobis) routing (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
  and Adversarial Attacks", NeurIPS 2018): class means ``mu_c`` and one shared covariance ``Sigma`` from training
  features; class score ``-1/2 (x - mu_c)^T Sigma^-1 (x - mu_c)``; a task's score is the max (or log-sum-exp) over
  its classes. Euclidean distance (nearest class mean) is the special case ``Sigma = I``. ``Sigma`` is the pooled
  within-class covariance shrunk toward ``tr(S)/d * I`` (Ledoit and Wolf 2004, in the streamable Rao-Blackwellised
  form of Chen et al. 2010, or OAS, or a fixed intensity) because ``d`` is close to or above the samples per task.
  Statistics stream task by task in ``O(classes x d + d^2)`` memory (``stats.ClassStatistics``); in each expert's
  own space, ``stats.TaskStatistics`` keeps one per task and ``per_expert_mahalanobis_scores`` scores them.
- Class-level selector: a selector head over all seen classes; a task's score is ``logsumexp`` over its classes.
- Expert confidence (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020): expert t's negative
  free energy ``logsumexp(f_t / T_t)`` or max logit, after a temperature ``T_t`` fitted on task t's validation data
  (Guo et al. 2017), because separately trained experts' raw logits are on different scales.
- Re-ranking (Lin et al., "Class Incremental Learning via Likelihood Ratio Based Task Prediction", ICLR 2024, TPL):
  a cheap router's top-m tasks are re-scored by a likelihood ratio in each candidate expert's space (task t's
  Mahalanobis score minus the nearest other task's) plus the expert's energy, at the cost of m expert passes.

Statistics, temperatures and weights come from training or validation data only. Every score is row-wise, so a
sample's route never depends on the other test samples. ``observability`` measures any router the same way:
task-id accuracy (macro, micro), the confusion matrix, recency bias, top-k hit rate and the oracle gap.
"""

from conpet_lightning.routing.observability import (
    oracle_gap,
    recency_bias,
    routing_confusion,
    routing_report,
    task_id_accuracy,
    topk_hit_rate,
)
from conpet_lightning.routing.scores import (
    class_level_task_scores,
    class_scores,
    combine,
    energy_scores,
    fit_temperature,
    likelihood_ratio_score,
    mahalanobis_task_scores,
    per_expert_mahalanobis_scores,
    rerank_topm,
)
from conpet_lightning.routing.stats import (
    ClassStatistics,
    FinalizedStatistics,
    TaskStatistics,
    class_to_task_map,
    shrinkage_intensity,
)

__all__ = [
    "ClassStatistics",
    "FinalizedStatistics",
    "TaskStatistics",
    "class_level_task_scores",
    "class_scores",
    "class_to_task_map",
    "combine",
    "energy_scores",
    "fit_temperature",
    "likelihood_ratio_score",
    "mahalanobis_task_scores",
    "oracle_gap",
    "per_expert_mahalanobis_scores",
    "recency_bias",
    "rerank_topm",
    "routing_confusion",
    "routing_report",
    "shrinkage_intensity",
    "task_id_accuracy",
    "topk_hit_rate",
]
