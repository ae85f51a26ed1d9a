"""The log shipper: output lines reach the Prefect API in order, kept in memory and then spooled while it
is away, never blocking the producer; a spool left behind is sent by the next shipper on the host."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import httpx
import pytest

from conftest import wait_for

from cq_prefect.log_shipper import LogShipper, LogShipperHandler, log_payload, replay_log_spools


class FlakyApi:
    """A stand-in for ``create_logs``: refuses connections while ``away``; records what it took."""

    def __init__(self, away: bool = False, delay: float = 0.0):
        self.away = away
        self.delay = delay
        self.taken: list[dict] = []
        self.attempts = 0
        self.refuse_next_with: int | None = None

    def write(self, logs) -> None:
        self.attempts += 1
        time.sleep(self.delay)
        if self.away:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        if self.refuse_next_with is not None:
            status, self.refuse_next_with = self.refuse_next_with, None
            request = httpx.Request("POST", "http://prefect/api/logs/")
            raise httpx.HTTPStatusError("refused", request=request, response=httpx.Response(status, request=request))
        self.taken.extend(logs)

    def close(self) -> None:
        pass

    def messages(self) -> list[str]:
        return [log["message"] for log in self.taken]


def _log(i: int, flow_run_id: str = "f") -> dict:
    record = logging.LogRecord("cq.output.f", logging.INFO, __file__, 1, f"line {i:05d}", None, None)
    return log_payload(record, record.getMessage(), flow_run_id)


def test_payload_is_what_the_prefect_api_takes():
    from prefect.client.schemas.actions import LogCreate

    flow_run_id = str(uuid.uuid4())
    payload = _log(7, flow_run_id)
    parsed = LogCreate.model_validate(payload)
    assert parsed.message == "line 00007" and str(parsed.flow_run_id) == flow_run_id and parsed.level == logging.INFO
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "y" * 1_200_000, None, None)
    assert log_payload(record, record.getMessage(), flow_run_id)["message"].endswith("... [truncated]")


def test_lines_arrive_in_order_across_an_outage_with_spooling(tmp_path):
    api = FlakyApi()
    shipper = LogShipper("f", writer=api, spool_dir=tmp_path, retry_interval=0.05, memory_limit=20_000)
    for i in range(100):
        shipper.put(_log(i))
    assert shipper.flush(timeout=10)
    api.away = True
    for i in range(100, 1100):  # ~200 KiB: past the memory limit, so most of it goes to the spool
        shipper.put(_log(i))
    wait_for(lambda: shipper.spooled, timeout=10, what="lines to be spooled")
    assert list(tmp_path.glob("f-*.jsonl"))
    assert not shipper.flush(timeout=0.3)
    api.away = False
    for i in range(1100, 1200):
        shipper.put(_log(i))
    assert shipper.close(timeout=30)
    assert api.messages() == [f"line {i:05d}" for i in range(1200)]
    assert not list(tmp_path.iterdir())  # spool and lock file gone


def test_put_never_waits_for_the_api(tmp_path):
    api = FlakyApi(away=True, delay=0.5)
    shipper = LogShipper("f", writer=api, spool_dir=tmp_path, retry_interval=0.05)
    started = time.monotonic()
    for i in range(5000):
        shipper.put(_log(i))
    assert time.monotonic() - started < 1.0
    api.away, api.delay = False, 0.0
    assert shipper.close(timeout=30)
    assert len(api.taken) == 5000


def test_a_refused_batch_is_dropped_and_the_rest_goes_on(tmp_path):
    api = FlakyApi()
    api.refuse_next_with = 422
    shipper = LogShipper("f", writer=api, spool_dir=tmp_path, retry_interval=0.05)
    shipper.put(_log(0))
    wait_for(lambda: shipper.records_dropped == 1, timeout=10, what="the refused batch to be dropped")
    shipper.put(_log(1))
    assert shipper.close(timeout=10)
    assert api.messages() == ["line 00001"]


def test_what_close_could_not_send_is_sent_by_the_next_shipper_on_the_host(tmp_path):
    api = FlakyApi(away=True)
    first = LogShipper("f", writer=api, spool_dir=tmp_path, retry_interval=0.05)
    for i in range(300):
        first.put(_log(i))
    assert not first.close(timeout=0.5)  # the API is away: the lines stay on disk
    assert list(tmp_path.glob("f-*.jsonl"))

    busy = LogShipper("g", writer=FlakyApi(away=True), spool_dir=tmp_path, retry_interval=0.05, memory_limit=1)
    busy.put(_log(0, "g"))
    wait_for(lambda: busy.spooled, timeout=10, what="the live shipper to spool")

    api.away = False
    assert replay_log_spools(tmp_path, timeout=10, writer=api) == 1  # the live shipper's spool is left alone
    assert api.messages() == [f"line {i:05d}" for i in range(300)]
    assert not list(tmp_path.glob("f-*"))
    assert list(tmp_path.glob("g-*.jsonl"))
    busy.close(timeout=0)


def test_handler_ships_records_of_a_logger(tmp_path):
    api = FlakyApi()
    shipper = LogShipper("f", writer=api, spool_dir=tmp_path)
    logger = logging.getLogger(f"cq.output.test-{uuid.uuid4().hex[:6]}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(LogShipperHandler(shipper))
    threads = [threading.Thread(target=lambda: [logger.info("a\nb") for _ in range(100)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shipper.close(timeout=10)
    assert len(api.taken) == 400 and {log["message"] for log in api.taken} == {"a\nb"}
    assert {log["flow_run_id"] for log in api.taken} == {"f"}


@pytest.mark.e2e
@pytest.mark.prefect_db
def test_lines_reach_the_real_run_log(stack, prefect_client, tmp_path):
    from prefect import flow
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.states import Running

    @flow(name="log-shipper-test")
    def noop():
        pass

    run = prefect_client.create_flow_run(noop, state=Running())
    shipper = LogShipper(str(run.id), spool_dir=tmp_path)  # the real writer: Prefect's client
    for i in range(50):
        shipper.put(_log(i, str(run.id)))
    assert shipper.close(timeout=30)
    logs = prefect_client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=100)
    assert sorted(log.message for log in logs) == [f"line {i:05d}" for i in range(50)]
