"""One job's Hydra run for featsweep's writer task: what ``hydra.core.utils.run_job`` does, at a
cost that does not grow with the size of Hydra's config.

Hydra's ``run_job`` spends ~40 ms per job on bookkeeping that a batched sweep of 1,000 jobs pays
1,000 times: two ``HydraConfig.set_config`` calls (each a deep copy of the ``hydra`` node), two
more deep copies of the config for the JobReturn, and three YAML dumps of nearly identical
configs. :func:`run_job` writes the same job directory and returns an equal JobReturn:

- the job directory (``hydra.sweep.dir``/``hydra.sweep.subdir``), ``hydra.runtime.output_dir``
  set in the job's config, ``hydra.job.chdir`` honoured, ``hydra.job.env_set`` applied around the
  task, the job's log configured from ``hydra.job_logging``, loggers flushed;
- ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` byte for byte as Hydra writes
  them (:class:`YamlTemplates`);
- a JobReturn whose ``cfg`` and ``hydra_cfg`` (deep copies in Hydra) are made when first read
  (:class:`LazyJobReturn`): Hydra's sweepers read only the status and the return value.

It never touches Hydra's ``HydraConfig`` singleton: featsweep's writer is given the job's
directory. So it applies only when no Hydra callback reads the singleton per job: with a
callback that implements ``on_job_start`` or ``on_job_end`` (or ``hydra.launcher.run_job=hydra``)
every job goes through Hydra's own ``run_job``.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _flush_loggers,
    configure_log,
    env_override,
)
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf._utils import get_omega_conf_dumper

RUN_JOB_MODES = ("featsweep", "hydra")


def per_job_callbacks(hydra_context: Any) -> bool:
    """Whether a configured Hydra callback implements on_job_start / on_job_end (they may read
    ``HydraConfig``, which only Hydra's ``run_job`` sets per job)."""
    callbacks = getattr(getattr(hydra_context, "callbacks", None), "callbacks", None)
    if callbacks is None:
        return True  # an unknown Callbacks object: assume it needs Hydra's run_job
    return any(type(cb).on_job_start is not Callback.on_job_start
               or type(cb).on_job_end is not Callback.on_job_end for cb in callbacks)


class LazyJobReturn(JobReturn):
    """A JobReturn whose ``cfg`` (the task's config, without ``hydra``) and ``hydra_cfg`` (the
    ``hydra`` node alone) are the copies Hydra's ``run_job`` makes, made on first read from the
    job's config (which the launcher no longer changes once the job is written)."""

    def __init__(self, source: DictConfig, **fields: Any) -> None:
        self._source = source
        self._cfg: DictConfig | None = None
        self._hydra_cfg: DictConfig | None = None
        super().__init__(**fields)

    @property  # type: ignore[override]
    def cfg(self) -> DictConfig | None:
        if self._cfg is None and self._source is not None:
            task_cfg = copy.deepcopy(self._source)
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            self._cfg = task_cfg
        return self._cfg

    @cfg.setter
    def cfg(self, value: DictConfig | None) -> None:
        self._cfg = value

    @property  # type: ignore[override]
    def hydra_cfg(self) -> DictConfig | None:
        if self._hydra_cfg is None and self._source is not None:
            self._hydra_cfg = OmegaConf.masked_copy(self._source, "hydra")
        return self._hydra_cfg

    @hydra_cfg.setter
    def hydra_cfg(self, value: DictConfig | None) -> None:
        self._hydra_cfg = value


def job_return(config: DictConfig, out: Path, status: JobStatus = JobStatus.UNKNOWN,
               value: Any = None) -> LazyJobReturn:
    """The JobReturn ``run_job`` gives for `config` written into `out`, with `status`/`value`
    (used as is for a job that resume keeps: not run, not written)."""
    overrides = OmegaConf.to_container(config.hydra.overrides.task)
    assert isinstance(overrides, list)
    chdir = bool(config.hydra.job.chdir)
    ret = LazyJobReturn(config, overrides=overrides,
                        working_dir=str(out) if chdir else os.getcwd(),
                        task_name=_task_name(config), status=status)
    ret.return_value = value
    return ret


def set_output_dir(config: DictConfig, out: Path) -> None:
    """``hydra.runtime.output_dir`` of the job (as run_job sets it), its ``hydra`` node then
    read-only (as ``HydraConfig.set_config`` leaves it)."""
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = str(out)
    OmegaConf.set_readonly(config.hydra, True)


class JobLogging:
    """``configure_log(hydra.job_logging, hydra.verbose)`` for job after job, at the cost of
    reopening the log file when only its path changed.

    Hydra's ``configure_log`` builds every handler and formatter again from the config for each
    job (~2 ms). Consecutive jobs of a sweep differ only in the log file's path
    (``${hydra.runtime.output_dir}/...``), so when the previous call configured the logging
    that is still in place (the root logger holds the same handlers) from the same config up to
    the file names, the root's ``logging.FileHandler`` s are pointed at the new files instead:
    the same handlers, formatters and levels a new configuration would give. Any other case
    (another config or verbosity, ``disable_existing_loggers: true``, handlers on other loggers,
    an interpolation outside ``filename``, logging reconfigured in between) goes through
    Hydra's ``configure_log``.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._root: list[logging.Handler] = []
        self._files: dict[str, logging.FileHandler] = {}

    def __getstate__(self) -> dict:  # a submitit task gets the launcher: open files stay here
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def configure(self, config: DictConfig) -> None:
        log_config, verbose = config.hydra.job_logging, config.hydra.verbose
        key = _logging_key(log_config, verbose)
        root = logging.getLogger()
        if key is not None and key == self._key and root.handlers == self._root:
            for name, handler in self._files.items():
                path = os.path.abspath(str(OmegaConf.select(log_config, f"handlers.{name}.filename")))
                if path != handler.baseFilename:
                    stream = open(path, handler.mode, encoding=handler.encoding,
                                  errors=handler.errors)
                    handler.baseFilename = path
                    old = handler.setStream(stream)  # flushes the old file
                    if old is not None:
                        old.close()
            return
        configure_log(log_config, verbose)
        self._key, self._root = key, list(root.handlers)
        self._files = {str(h.name): h for h in root.handlers if type(h) is logging.FileHandler}


def _logging_key(log_config: DictConfig | None, verbose: Any) -> str | None:
    """The job logging config as text without the file names, when :class:`JobLogging` may
    reuse a configuration made from it; else None."""
    if log_config is None:
        return None
    raw = OmegaConf.to_container(log_config, resolve=False)
    assert isinstance(raw, dict)
    root = raw.get("root")
    handlers = raw.get("handlers") or {}
    if (not isinstance(root, dict) or raw.get("disable_existing_loggers", True) is not False
            or raw.get("incremental") or any(v.get("handlers") for v in (raw.get("loggers") or {}).values())
            or set(handlers) != set(root.get("handlers") or [])):
        return None
    for name, handler in handlers.items():
        if handler.get("class") == "logging.FileHandler":
            handler = dict(handler)
            handler.pop("filename", None)
            handlers[name] = handler
    text = repr((raw, OmegaConf.to_container(verbose) if OmegaConf.is_config(verbose) else verbose))
    return None if "${" in text else text


def run_job(config: DictConfig, out: Path, task: Callable[[DictConfig, Path], Any],
            yaml_files: "YamlTemplates", job_logging: JobLogging | None = None
            ) -> LazyJobReturn | None:
    """Run `task(config, out)` as job `config` in directory `out` (absolute), the way Hydra's
    ``run_job`` runs a task (module docstring); return its JobReturn. The task gets the whole
    job config (``hydra`` included) and its directory, and never needs ``HydraConfig``.

    None, with nothing done but ``hydra.runtime.output_dir`` set (as Hydra's run_job sets it),
    when a resolver in the config may read ``HydraConfig`` (:func:`reads_singleton`): the
    caller then runs the job with Hydra's own ``run_job``."""
    set_output_dir(config, out)
    body = OmegaConf.to_container(config, resolve=False, enum_to_str=True)
    assert isinstance(body, dict)
    if reads_singleton(body):
        return None
    old_cwd = os.getcwd()
    chdir = bool(config.hydra.job.chdir)
    out.mkdir(parents=True, exist_ok=True)
    ret = job_return(config, out)
    try:
        if chdir:
            os.chdir(out)
        if job_logging is None:
            configure_log(config.hydra.job_logging, config.hydra.verbose)
        else:
            job_logging.configure(config)
        if config.hydra.output_subdir is not None:
            hydra_output = out / str(config.hydra.output_subdir)
            hydra_output.mkdir(parents=True, exist_ok=True)
            hydra_node = {"hydra": body.pop("hydra")}
            overrides = hydra_node["hydra"]["overrides"]["task"]
            for name, container in (("config.yaml", body), ("hydra.yaml", hydra_node),
                                    ("overrides.yaml", overrides)):
                text = yaml_files.dump(name, container)
                with open(hydra_output / name, "w", encoding="utf-8") as file:
                    file.write(text)
        env = OmegaConf.to_container(config.hydra.job.env_set, resolve=True)
        assert isinstance(env, dict)
        with env_override({str(k): str(v) for k, v in env.items()}):
            try:
                ret.return_value = task(config, out)
                ret.status = JobStatus.COMPLETED
            except Exception as exc:
                ret.return_value = exc
                ret.status = JobStatus.FAILED
        _flush_loggers()  # Hydra's own, as its run_job calls it: the job's log file is complete
        return ret
    finally:
        if chdir:
            os.chdir(old_cwd)


# A resolver call in a config string: ${name:...}
_RESOLVER = re.compile(r"\$\{\s*([\w.]+)\s*:")


def may_read_singleton(resolver: str) -> bool:
    """Whether the resolver named `resolver` may read Hydra's ``HydraConfig`` (``hydra``, or any
    of the user's); ``now`` (cached from the sweep's start) and OmegaConf's own ``oc.*`` never
    do. The one rule for :func:`reads_singleton` and ``_plan.needs_hydra_singleton``."""
    return resolver != "now" and not resolver.startswith("oc.")


def reads_singleton(container: Any) -> bool:
    """Whether a config (as plain containers, unresolved) calls a resolver that
    :func:`may_read_singleton`."""
    stack = [container]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and "${" in node:
            if any(may_read_singleton(name) for name in _RESOLVER.findall(node)):
                return True
    return False


def _task_name(config: DictConfig) -> str:
    try:
        return str(JobRuntime.instance().get("name"))
    except KeyError:
        return str(config.hydra.job.name)


# ------------------------------------------------------------------------------ YAML files


class _SpanDumper(get_omega_conf_dumper()):  # type: ignore[misc]
    """OmegaConf's YAML dumper that records where each scalar's text lands in the output."""

    def __init__(self, stream: io.StringIO, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self.spans: list[tuple[int, int]] = []

    def process_scalar(self) -> None:
        start = self.stream.tell()
        super().process_scalar()
        self.spans.append((start, self.stream.tell()))


_DUMP = {"default_flow_style": False, "allow_unicode": True, "sort_keys": False}


def _dump_with_spans(container: Any) -> tuple[str, list[tuple[int, int]]]:
    """``OmegaConf.to_yaml``'s text of `container` (what ``yaml.dump`` does with OmegaConf's
    dumper and options), and the (start, end) of every scalar event's text, in event order."""
    stream = io.StringIO()
    dumper = _SpanDumper(stream, **_DUMP)
    try:
        dumper.open()
        dumper.represent(container)
        dumper.close()
    finally:
        dumper.dispose()
    return stream.getvalue(), dumper.spans


def _leaves(node: Any) -> Iterator[Any]:
    """The scalars of `node` in the order the YAML serializer emits them (a mapping's key,
    then its value)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _leaves(value)
    elif isinstance(node, list):
        for item in node:
            yield from _leaves(item)
    else:
        yield node


def _changed(old: Any, new: Any, out: list[tuple[int, Any, Any]], index: list[int]) -> bool:
    """Walk `old` and `new` together; append (scalar index, old, new) for each scalar that
    differs to `out`. False when the two differ in shape (keys, lengths, a container where a
    scalar was), which no template can serve."""
    if isinstance(old, dict):
        if not isinstance(new, dict) or len(old) != len(new):
            return False
        for (k_old, v_old), (k_new, v_new) in zip(old.items(), new.items()):
            if type(k_old) is not type(k_new) or k_old != k_new:
                return False
            index[0] += 1
            if not _changed(v_old, v_new, out, index):
                return False
        return True
    if isinstance(old, list):
        if not isinstance(new, list) or len(old) != len(new):
            return False
        return all(_changed(a, b, out, index) for a, b in zip(old, new))
    if isinstance(new, (dict, list)):
        return False
    # repr, not ==: -0.0 == 0.0 and 1 == True, yet YAML writes them differently.
    if type(old) is not type(new) or repr(old) != repr(new):
        out.append((index[0], old, new))
    index[0] += 1
    return True


class _Template:
    def __init__(self, container: Any) -> None:
        self.container = copy.deepcopy(container)
        self.text, self.spans = _dump_with_spans(container)
        # Aliases (an object dumped twice) would break the event <-> scalar correspondence.
        self.usable = len(self.spans) == sum(1 for _ in _leaves(container))


class YamlTemplates:
    """``OmegaConf.to_yaml`` of many configs that differ in a few scalar values, byte for byte.

    For each file name it keeps the first configs' texts as templates, with the position of
    every scalar in them. A config of the same shape as a template (same keys, same list lengths)
    is written as the template with its changed scalars' texts replaced; the text of each
    replacement is what the dumper writes for that value as a mapping value. That is exact only
    where the emitter's text of the rest cannot depend on the value: so a replacement is made
    only when the old and the new value's texts are single lines with no space (plain or
    single-quoted: nothing to fold at the line width), and the template's text of the old value
    is exactly what the same rule gives for it. Anything else (a new shape, a long string with
    spaces, a multi-line value) is dumped in full. tests/test_job_run.py compares with
    ``OmegaConf.to_yaml`` over many configs.
    """

    MAX_TEMPLATES = 16  # per file name: the shapes of a sweep's structural groups

    def __init__(self) -> None:
        self._templates: dict[str, list[_Template]] = {}
        self._texts: dict[tuple[type, str], str | None] = {}
        self.stats = {"template": 0, "full": 0}

    def dump(self, name: str, container: Any) -> str:
        """The YAML text of `container` for file `name` (OmegaConf.to_yaml's)."""
        templates = self._templates.setdefault(name, [])
        for n, template in enumerate(templates):
            text = self._fill(template, container) if template.usable else None
            if text is not None:
                if n:  # most recently used first
                    templates.insert(0, templates.pop(n))
                self.stats["template"] += 1
                return text
        template = _Template(container)
        templates.insert(0, template)
        del templates[self.MAX_TEMPLATES:]
        self.stats["full"] += 1
        return template.text

    def _fill(self, template: _Template, container: Any) -> str | None:
        changes: list[tuple[int, Any, Any]] = []
        if not _changed(template.container, container, changes, [0]):
            return None
        parts, pos = [], 0
        for index, old, new in changes:
            start, end = template.spans[index]
            old_text, new_text = self._text(old), self._text(new)
            if old_text is None or new_text is None or template.text[start:end] != old_text:
                return None
            parts.append(template.text[pos:start])
            parts.append(new_text)
            pos = end
        parts.append(template.text[pos:])
        return "".join(parts)

    def _text(self, value: Any) -> str | None:
        """What the dumper writes for `value` as a block mapping value, with its leading space;
        None unless it is one line without spaces."""
        key = (type(value), repr(value))
        if key in self._texts:
            return self._texts[key]
        text, spans = _dump_with_spans({"k": value})
        scalar = text[spans[1][0]:spans[1][1]] if len(spans) == 2 else ""
        ok = (text == f"k:{scalar}\n" and scalar.startswith(" ") and " " not in scalar[1:]
              and "\n" not in scalar and not scalar[1:].startswith('"'))
        self._texts[key] = scalar if ok else None
        return self._texts[key]
