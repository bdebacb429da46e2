"""The errors a user can fix, under one base: the ``byol`` command prints the message as its last line
(``byol <command>: error: <message>``) instead of a traceback. Each message names the key, file, shard, URI or
rank at fault and what to do. Anything that is not a :class:`UserError` is a bug and keeps its traceback.

Every class takes one argument, the message, so an error raised on a training worker travels to the driver
(pickled with Ray's return value) and is raised there as itself.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and how, in one line (config errors: one per key)."""


class ConfigError(UserError, ValueError):
    """A config key, ``--set`` override or command-line argument is invalid."""


class PlanError(ConfigError):
    """The config does not fit the data (e.g. a global batch larger than the training split)."""


class DataError(UserError, ValueError):
    """A dataset cannot be read or used: a missing manifest, split or shard, a source that cannot be prepared."""


class BadRecord(DataError):
    """One image record cannot be decoded or has the wrong size (the message gives the reason, key and shard)."""


class TrackingError(UserError):
    """The MLflow store cannot be used the way the run needs (e.g. a file store on a multi-node cluster)."""


class SubmitError(UserError):
    """A Ray job cannot be submitted: no address, an unreachable job server, a refused token, an oversized upload."""


class StudyError(UserError):
    """A ``byol tune`` study cannot start or finished without a usable trial."""


class TrainingError(UserError):
    """A pretraining run could not finish."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or Inf on some rank: training diverged."""


class TargetsOutOfSyncError(TrainingError):
    """The EMA targets of the data-parallel ranks are no longer bit-identical."""


def user_error_class(error: BaseException) -> type[UserError]:
    """The class of this module that ``error``, or an error it was raised from, is an instance of, else
    :class:`TrainingError`: what a worker sends to the driver when every rank stops together, so the driver raises
    the same kind of error. Ray re-raises a task's error as a subclass made on the fly (which pickle, as torch's
    object collectives use it, cannot carry), and Ray Data wraps a map's error in its own ``UserCodeException``: the
    class of this module is looked for along the chain of causes."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for cls in type(error).__mro__:
            if cls.__module__ == __name__ and issubclass(cls, UserError):
                return cls
        error = error.__cause__ or getattr(error, "cause", None)
    return TrainingError
