"""`/v1/batches`: many audios against one video or avatar, one job each (`<batch>--000`, ...)."""
from __future__ import annotations

import shutil
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from cluster.errors import JobNotFound, LipsyncError
from cluster.render import new_job_id
from cluster.schemas import BatchCreate, BatchView, ErrorInfo, JobState, batch_job_id
from service.auth import require_token
from service.backend import Backend, get_backend
from service.errors import ApiProblem, QueueFull, error_responses, field_of
from service.uploads import json_body, openapi_json_body

router = APIRouter(prefix="/v1/batches", tags=["batches"], dependencies=[Depends(require_token)],
                   responses=error_responses())


@router.post("", status_code=202, response_model=BatchView, summary="Many audios against one video or avatar",
             openapi_extra=openapi_json_body(BatchCreate))
async def create_batch(request: Request, backend: Backend = Depends(get_backend)) -> JSONResponse:
    body = await json_body(request, BatchCreate)  # read once the token is checked
    settings = backend.settings
    if len(body.audios) > settings.max_batch_jobs:
        raise ApiProblem(422, "input.invalid", f"a batch carries at most {settings.max_batch_jobs} audios "
                         f"(LIPSYNC_MAX_BATCH_JOBS), got {len(body.audios)}", "audios")
    if len(body.audios) > settings.max_queued_jobs:  # would be refused as busy on an idle service too
        raise ApiProblem(422, "input.invalid", f"a batch of {len(body.audios)} audios can never fit the job queue, "
                         f"which holds at most {settings.max_queued_jobs} unfinished jobs (LIPSYNC_MAX_QUEUED_JOBS): "
                         f"send at most {settings.max_queued_jobs} per batch", "audios")
    await backend.refuse_what_cannot_succeed(body.video, body.avatar_id, body.model, body.callback_url)
    n = await backend.gateway.unfinished_count(settings.max_queued_jobs)
    if n + len(body.audios) > settings.max_queued_jobs and \
            not await backend.known(batch_job_id(body.id, 0) if body.id else None):
        jobs = f"{len(body.audios)} more job{'s' if len(body.audios) > 1 else ''}"
        raise QueueFull(f"the job queue cannot take {jobs} ({n} unfinished, "
                        f"LIPSYNC_MAX_QUEUED_JOBS={settings.max_queued_jobs}); retry later")
    batch_id = body.id or new_job_id()
    tmpdir = backend.tmpdir()
    admitting = backend.batches_admitting  # its view is not final while this admits its audios
    admitting[batch_id] = admitting.get(batch_id, 0) + 1
    try:
        staged = {}
        if body.video is not None:
            staged["video"] = await backend.stage_input(body.video, "video", tmpdir)
        for i, audio in enumerate(body.audios):
            try:
                # its first job holds how many audios the batch asked for: its view counts those refused
                # (a batch whose later audio was refused read succeeded over the jobs before it), and the
                # same id with more or fewer audios is another batch (job.conflict)
                st = await backend.create_job(batch_job_id(batch_id, i), audio, body.video, body.avatar_id,
                                              body.sync_mode, body.model, tmpdir, staged, crf=body.crf,
                                              batch_size=len(body.audios) if i == 0 else None,
                                              id_chosen=body.id is not None)
                await backend.register_callback(st.id, body.callback_url)
            except (LipsyncError, ApiProblem) as e:  # the jobs before it run: name them, and how to go on
                if e.field is None:  # the field it is about; this audio's is `audios`
                    field = field_of(e, {"audio": str(audio), "video": body.video, "avatar_id": body.avatar_id,
                                         "model": body.model}) if isinstance(e, LipsyncError) else None
                    e.field = "audios" if field in (None, "audio") else field
                from actors.service_support import AdmissionUnanswered  # (ray: imported where it is running)

                unanswered = e if isinstance(e, AdmissionUnanswered) else None  # no answer came in time
                if i or unanswered is not None:  # the batch is sent again under its id, not its job's
                    accepted = ("" if i == 0 else f"; its job {batch_job_id(batch_id, 0)} was accepted" if i == 1 else
                                f"; its jobs {batch_job_id(batch_id, 0)} to {batch_job_id(batch_id, i - 1)} were "
                                f"accepted")
                    said = e.message if unanswered is None else f"{unanswered.unanswered}; its job {unanswered.fate}"
                    fix = "send" if unanswered is not None else "correct it and send"  # (the same audio fails again)
                    e.message = (f"batch {batch_id}: audio {i} ({audio}): {said}{accepted} ({fix} the request again "
                                 f"with id {batch_id}: jobs already accepted are not submitted twice)")
                if unanswered is not None and body.id is not None:  # stored late, maybe: not `failed` meanwhile
                    backend.batch_admitted_late(batch_id)
                raise
    finally:
        if (left := admitting.pop(batch_id) - 1) > 0:
            admitting[batch_id] = left
        shutil.rmtree(tmpdir, ignore_errors=True)
    view = await batch_view(backend, batch_id, len(body.audios))
    return JSONResponse(view.model_dump(mode="json"), status_code=202)


@router.get("/{batch_id}", response_model=BatchView, summary="One status over a batch's jobs")
async def get_batch(batch_id: str, backend: Backend = Depends(get_backend)) -> BatchView:
    return await batch_view(backend, batch_id)


@router.delete("/{batch_id}", response_model=BatchView,
               summary="Cancel the batch's unfinished jobs (finished ones are left as they are)")
async def cancel_batch(batch_id: str, backend: Backend = Depends(get_backend)) -> BatchView:
    view = await batch_view(backend, batch_id)
    refused = None
    for job in view.jobs:  # each is asked: one that does not answer in time does not leave the others running
        if not job.state.terminal:
            try:
                await backend.gateway.cancel(job.id)
            except LipsyncError as e:
                refused = refused or e
    if refused is not None:
        raise refused
    return await batch_view(backend, batch_id, len(view.jobs))


async def batch_view(backend: Backend, batch_id: str, n: int | None = None) -> BatchView:
    """The batch's jobs and one state over them. Its size is the one its first job holds (a batch made
    before it was recorded: its jobs up to the first id missing); audios of it that were never
    admitted count as `not_admitted`, and make the batch `failed` once its other jobs ended, unless a
    request may still be admitting them (`_may_be_admitting`): they count as queued jobs until then."""
    jobs = []
    try:
        first = await backend.gateway.get(batch_job_id(batch_id, 0))
    except JobNotFound:
        raise JobNotFound(f"batch {batch_id} does not exist", code="batch.not_found", path="batch_id") from None
    size = first.request.batch_size if first.request is not None and first.request.batch_size else None
    jobs.append(backend.view(first))
    i = 1
    while i < (size or n or 2**31):
        try:
            jobs.append(backend.view(await backend.gateway.get(batch_job_id(batch_id, i))))
        except JobNotFound:
            if size is None:
                break
        i += 1
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.state.value] = counts.get(j.state.value, 0) + 1
    missing = (size or len(jobs)) - len(jobs)
    states = [j.state for j in jobs]
    if missing:
        counts["not_admitted"] = missing
        if all(s.terminal for s in states) and JobState.cancelled not in states:  # (cancelled: asked for)
            states.append(JobState.queued if _may_be_admitting(backend, batch_id, jobs) else JobState.failed)
    progress = sum(j.progress for j in jobs) / (size or len(jobs))
    state = batch_state(states)
    return BatchView(id=batch_id, state=state, progress=progress, counts=counts, jobs=jobs,
                     error=batch_error(batch_id, jobs, missing) if state == JobState.failed else None)


def batch_error(batch_id: str, jobs: list, missing: int) -> ErrorInfo:
    """Why a failed batch failed, in one error: its first failed job's, counted and named (the others are
    in their jobs' views), and its audios that were never admitted, with what to do about them."""
    failed = [j for j in jobs if j.state == JobState.failed]
    total = len(jobs) + missing
    never = "" if not missing else (f"{missing} of its {total} audios {'was' if missing == 1 else 'were'} never "
                                    f"admitted (one was refused when the batch was submitted, with its reason, and "
                                    f"those after it were not tried): correct it and send the batch again under "
                                    f"its id (its jobs already admitted are answered as they are)")
    if not failed:
        return ErrorInfo(code="batch.incomplete", message=f"batch {batch_id}: {never}")
    first = failed[0]
    some = f"job {first.id} failed" if len(failed) == 1 else \
        f"{len(failed)} of its {total} audios' jobs failed; the first, {first.id}"
    why = first.error or ErrorInfo(code="render.failed", message="(no reason recorded)")
    also = f"; and {never}" if never else ""
    return why.model_copy(update={"message": f"batch {batch_id}: {some}: {why.message}{also}"})


def _may_be_admitting(backend: Backend, batch_id: str, jobs: list) -> bool:
    """Whether a request may still be admitting audios of the batch: one on this replica is (or was answered
    503 within one admission window, under the batch's own id: the job manager may still store that audio's
    job, `ManagerGateway.submit`), or, where
    the service has other ingress replicas (which may hold it), its newest job was admitted less than one
    job's admission window ago. (A view read while its POST admitted a slow audio said `failed`, and
    `succeeded` once that audio rendered.)"""
    if batch_id in backend.batches_admitting or backend.may_be_admitted_late(batch_id):
        return True
    if backend.settings.serve_replicas <= 1:
        return False
    newest = max(j.created_at for j in jobs)
    return (datetime.now(timezone.utc) - newest).total_seconds() < backend.admission_window_s()


def batch_state(states: list[JobState]) -> JobState:
    """One state over a batch's jobs: once all ended, succeeded only if every job did, failed if any
    failed, else cancelled (a batch cancelled by its user is no failure);
    rendering once any job is past preparing; preparing while any is (none rendering yet); else queued."""
    if all(st.terminal for st in states):
        if all(st == JobState.succeeded for st in states):
            return JobState.succeeded
        return JobState.failed if JobState.failed in states else JobState.cancelled  # cancelled: asked for
    if any(st not in (JobState.queued, JobState.preparing) for st in states):
        return JobState.rendering
    return JobState.preparing if JobState.preparing in states else JobState.queued
