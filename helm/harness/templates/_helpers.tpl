{{/* Chart name. */}}
{{- define "harness.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "harness.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "harness.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "harness.selectorLabels" -}}
app.kubernetes.io/name: {{ include "harness.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "harness.workerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "harness.name" . }}-worker
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "harness.workerLabels" -}}
helm.sh/chart: {{ include "harness.chart" . }}
{{ include "harness.workerSelectorLabels" . }}
app.kubernetes.io/component: worker
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* A worker group's pods: a name label of their own, so no other selector matches them. */}}
{{- define "harness.groupSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-worker-%s" (include "harness.name" .root) .group | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "harness.groupLabels" -}}
helm.sh/chart: {{ include "harness.chart" .root }}
{{ include "harness.groupSelectorLabels" . }}
app.kubernetes.io/component: worker-group
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* Every pod name label of the release's replicas: the API's, the workers', each group's. */}}
{{- define "harness.podNames" -}}
{{- $names := list (include "harness.name" .) (printf "%s-worker" (include "harness.name" .)) }}
{{- range .Values.workerGroups }}
{{- $names = append $names (printf "%s-worker-%s" (include "harness.name" $) .name | trunc 63 | trimSuffix "-") }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* The work of some queues, what KEDA scales a group on: their runnable backlog (due now, in
a queue not paused; tasks_queue_claim_idx) plus their running tasks (tasks_status_idx), so
that a group is not scaled down under tasks it is running. Queue names are checked by
values.schema.json. */}}
{{- define "harness.runnableQuery" -}}
{{- $quoted := list }}
{{- range . }}{{ $quoted = append $quoted (printf "'%s'" .) }}{{ end }}
{{- $in := join ", " $quoted }}
{{- printf "SELECT (SELECT count(*) FROM tasks WHERE queue IN (%s) AND status IN ('pending', 'retry_scheduled') AND scheduled_at <= now() AND queue NOT IN (SELECT name FROM queues WHERE paused)) + (SELECT count(*) FROM tasks WHERE queue IN (%s) AND status = 'running')" $in $in }}
{{- end }}

{{- define "harness.labels" -}}
helm.sh/chart: {{ include "harness.chart" . }}
{{ include "harness.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The database URL the chart stores: database.url, or the bundled PostgreSQL's. */}}
{{- define "harness.databaseUrl" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "postgres://harness:%s@%s-postgresql:5432/harness" (urlquery .Values.postgresql.password | replace "+" "%20") (include "harness.fullname" .) -}}
{{- else -}}
{{- .Values.database.url -}}
{{- end -}}
{{- end }}

{{- define "harness.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "harness.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "harness.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secret holding DATABASE_URL (and API tokens). */}}
{{- define "harness.secretName" -}}
{{- default (include "harness.fullname" .) .Values.database.existingSecret }}
{{- end }}

{{/* Fail early when no database secret is configured (also enforced by values.schema.json). */}}
{{- define "harness.validate" -}}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) (not .Values.postgresql.enabled) }}
{{- fail "database.url or database.existingSecret is required (or postgresql.enabled=true to try the chart with a bundled database)" }}
{{- end }}
{{- if and .Values.postgresql.enabled (lt (len .Values.postgresql.password) 12) }}
{{- fail "postgresql.password must have at least 12 characters" }}
{{- end }}
{{- if lt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount must be at least 1" }}
{{- end }}
{{- if and .Values.database.existingSecret .Values.api.tokens }}
{{- fail "api.tokens are ignored with database.existingSecret: put HARNESS_API__TOKENS in that Secret (api.tokensKey) and leave api.tokens empty" }}
{{- end }}
{{- if or (dig "database" "url" "" .Values.config) (dig "database" "session_url" "" .Values.config) (dig "api" "tokens" list .Values.config) (dig "escalation" "webhook_url" "" .Values.config) }}
{{- fail "config.database.url, config.database.session_url, config.api.tokens and config.escalation.webhook_url would land in a ConfigMap, readable by anyone who can read the namespace's ConfigMaps: use database.url / database.existingSecret, api.tokens, and extraEnv (and migration.extraEnv) from a Secret" }}
{{- end }}
{{- if eq .Values.image.repository "" }}
{{- fail "image.repository is required: build the image (docker build -f deploy/Dockerfile -t REGISTRY/agent-harness:APPVERSION .), push it, and set image.repository=REGISTRY/agent-harness" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- $pods := ternary (int .Values.autoscaling.maxReplicas) (int .Values.replicaCount) .Values.autoscaling.enabled }}
{{- $surge := int (dig "rollingUpdate" "maxSurge" 0 .Values.strategy) }}
{{- if .Values.workers.enabled }}
{{- /* The workers' Deployment surges too during a rollout. */}}
{{- $pods = add $pods (int .Values.workers.replicaCount) }}
{{- $surge = mul $surge 2 }}
{{- end }}
{{- range .Values.workerGroups }}
{{- /* Each group's Deployment surges too; with KEDA, at its most. */}}
{{- $pods = add $pods (int (ternary (dig "keda" "maxReplicaCount" 5 .) (default 1 .replicaCount) (dig "keda" "enabled" false .))) }}
{{- $surge = add $surge (int (dig "rollingUpdate" "maxSurge" 0 $.Values.strategy)) }}
{{- end }}
{{- $room := sub (int .Values.database.serverMaxConnections) (int .Values.database.reservedConnections) }}
{{- if .Values.database.sessionUrl }}
{{- /* The pools go to the pooler; straight to PostgreSQL: a listener and a heartbeat per pod, one more while it stops, the leader's lock session and its listener, the migration. */}}
{{- $need := add (mul (add $pods $surge) 3) 3 }}
{{- if gt (int $need) (int $room) }}
{{- fail (printf "PostgreSQL connections: (%d pods + %d surge) x 3 direct sessions per pod (a listener, a heartbeat, one while stopping) + 2 for the scheduler's leader + 1 migration = %d, over the %d the server allows (database.serverMaxConnections %d - reservedConnections %d); lower the pod count or raise database.serverMaxConnections" $pods $surge $need $room (int .Values.database.serverMaxConnections) (int .Values.database.reservedConnections)) }}
{{- end }}
{{- else }}
{{- $perPod := add (int (dig "database" "max_connections" 10 .Values.config)) 3 }}
{{- $need := add (mul (add $pods $surge) $perPod) 1 }}
{{- if gt (int $need) (int $room) }}
{{- fail (printf "PostgreSQL connections: (%d pods + %d surge) x %d per pod (config.database.max_connections + 3: the heartbeat, the leader's lock session, one while stopping) + 1 migration = %d, over the %d the server allows (database.serverMaxConnections %d - reservedConnections %d); lower the pod count or config.database.max_connections, raise database.serverMaxConnections, or put PgBouncer in front (database.sessionUrl)" $pods $surge $perPod $need $room (int .Values.database.serverMaxConnections) (int .Values.database.reservedConnections)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* /tmp of a pod: every agent running at once may write its largest file there. */}}
{{/* Tasks a pod runs at once: its group's queues' capacities (`slots`), else those of
config.worker.queues, else config.bulk.max_concurrent. */}}
{{- define "harness.slots" -}}
{{- $slots := 0 }}
{{- range $q, $n := (dig "worker" "queues" dict .root.Values.config) }}{{ $slots = add $slots (int $n) }}{{ end }}
{{- int (default (default (dig "bulk" "max_concurrent" 8 .root.Values.config) $slots) .slots) }}
{{- end }}

{{- define "harness.tmpSize" -}}
{{- $files := mul (int (include "harness.slots" .)) (int (dig "executor" "max_file_mb" 1024 .root.Values.config)) }}
{{- printf "%dMi" (add $files 256) }}
{{- end }}

{{/* Memory limit of a pod: what agents may use at once plus the harness itself. */}}
{{- define "harness.memoryLimit" -}}
{{- $agents := mul (int (include "harness.slots" .)) (int (dig "executor" "max_memory_mb" 256 .root.Values.config)) }}
{{- printf "%dMi" (add $agents (int .root.Values.harnessMemoryMi)) }}
{{- end }}

{{/* Seconds a pod gets after SIGTERM: the harness's task grace plus margin. */}}
{{- define "harness.terminationGrace" -}}
{{- $grace := dig "bulk" "shutdown_grace_s" 30 .Values.config }}
{{- add $grace .Values.preStopSeconds .Values.terminationGraceExtraSeconds }}
{{- end }}

{{/* DATABASE_URL from the Secret. */}}
{{- define "harness.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "harness.secretName" . }}
      key: {{ .Values.database.urlKey }}
{{- if or .Values.database.sessionUrl .Values.database.existingSecret }}
- name: HARNESS_DATABASE__SESSION_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "harness.secretName" . }}
      key: {{ .Values.database.sessionUrlKey }}
      optional: true
{{- end }}
{{- if .Values.database.sslMode }}
- name: PGSSLMODE
  value: {{ .Values.database.sslMode | quote }}
{{- end }}
{{- if .Values.database.caSecret }}
- name: PGSSLROOTCERT
  value: /etc/harness-database-ca/{{ .Values.database.caKey }}
{{- end }}
{{- end }}

{{/* Environment shared by the replicas. */}}
{{- define "harness.env" -}}
{{ include "harness.databaseEnv" . }}
- name: HARNESS_API__TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "harness.secretName" . }}
      key: {{ .Values.api.tokensKey }}
      optional: true
- name: HARNESS_CONFIG
  value: /etc/harness/harness.yml
# k8s.pod.name and k8s.namespace.name in the OpenTelemetry resource.
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: HARNESS_API__BIND
  value: "0.0.0.0:{{ .Values.containerPort }}"
- name: HARNESS_HOME
  value: /var/lib/harness/.harness
- name: HARNESS_TELEMETRY__LOGS_DIR
  value: /var/lib/harness/logs
- name: TMPDIR
  value: /tmp
{{- if .Values.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ default (include "harness.fullname" .) .Values.otel.serviceName | quote }}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.instance.id=$(POD_NAME),k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME)%s" (ternary (printf ",%s" .Values.otel.resourceAttributes) "" (ne .Values.otel.resourceAttributes "")) | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
