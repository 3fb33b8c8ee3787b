"""StatisticsService: proto in, vault call, proto out (policy section 3(3)).

Aggregates over members who consent to statistics, small cells suppressed by the
vault (vault.statistics) before anything reaches this layer.
"""

from __future__ import annotations

from typing import Protocol

from privacyvault.v1 import statistics_pb2 as pb
from privacyvault.v1 import statistics_pb2_grpc
from service.convert import purpose_from_pb, purpose_pb, timestamp
from service.interceptors import Context
from vault import Purpose
from vault.errors import FieldViolation, InvalidInput
from vault.statistics import StatisticsReport


class StatisticsApi(Protocol):
    """Vault.statistics, as the servicer uses it."""

    async def report(self, start_date: str = "", end_date: str = "") -> StatisticsReport: ...


class StatisticsServicer(statistics_pb2_grpc.StatisticsServiceServicer):
    def __init__(self, statistics: StatisticsApi) -> None:
        self._statistics = statistics

    async def GetStatistics(
        self, request: pb.GetStatisticsRequest, context: Context
    ) -> pb.GetStatisticsResponse:
        # Stated, so the caller policy checks the caller may use statistics.
        if purpose_from_pb(request.purpose, "purpose") is not Purpose.STATISTICS:
            raise InvalidInput([FieldViolation("purpose", "must be PURPOSE_STATISTICS")])
        report = await self._statistics.report(request.start_date, request.end_date)
        response = pb.GetStatisticsResponse(
            computed_at=timestamp(report.computed_at),
            minimum_cell_size=report.minimum_cell,
            members=report.members,
            active_members_30d=report.active_members,
        )
        for day in report.days:
            response.days.add(
                date=day.day.isoformat(), sign_ups=day.sign_ups, withdrawals=day.withdrawals
            )
        for c in report.consents:
            response.consents.add(
                purpose=purpose_pb(c.purpose),
                purpose_key=c.purpose,
                granted=c.granted,
                rate=c.rate,
            )
        return response
