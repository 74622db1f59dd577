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

{{- define "harness.labels" -}}
helm.sh/chart: {{ include "harness.chart" . }}
{{ include "harness.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
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
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "database.url or database.existingSecret is required" }}
{{- end }}
{{- if lt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount must be at least 1" }}
{{- end }}
{{- end }}

{{/* Seconds a pod gets after SIGTERM: the harness's task grace plus margin. */}}
{{- define "harness.terminationGrace" -}}
{{- $grace := dig "bulk" "shutdown_grace_s" 30 .Values.config }}
{{- add $grace .Values.terminationGraceExtraSeconds }}
{{- end }}

{{/* DATABASE_URL from the Secret. */}}
{{- define "harness.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "harness.secretName" . }}
      key: {{ .Values.database.urlKey }}
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
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
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
