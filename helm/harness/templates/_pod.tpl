{{/* The pod spec of a replica: `args` are its command line (serve, or serve --no-api). */}}
{{- define "harness.podSpec" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "harness.serviceAccountName" $root }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
# SIGTERM gives running tasks bulk.shutdown_grace_s; the kubelet waits a bit longer.
terminationGracePeriodSeconds: {{ include "harness.terminationGrace" $root }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: harness
    image: {{ include "harness.image" $root | quote }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    args: {{ toJson .args }}
    env:
      {{- include "harness.env" $root | nindent 6 }}
      {{- with .extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with $root.Values.extraEnvFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    ports:
      - name: http
        containerPort: {{ $root.Values.containerPort }}
        protocol: TCP
    {{- with $root.Values.startupProbe }}
    startupProbe:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $root.Values.livenessProbe }}
    livenessProbe:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $root.Values.readinessProbe }}
    readinessProbe:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if gt (int $root.Values.preStopSeconds) 0 }}
    # Endpoints drop the pod before it stops taking requests.
    lifecycle:
      preStop:
        exec:
          command: ["sleep", "{{ $root.Values.preStopSeconds }}"]
    {{- end }}
    resources:
      {{- $resources := deepCopy $root.Values.resources }}
      {{- $limits := default dict $resources.limits }}
      {{- if not (hasKey $limits "memory") }}
      {{- $_ := set $limits "memory" (include "harness.memoryLimit" (dict "root" $root "slots" .slots)) }}
      {{- end }}
      {{- $_ := set $resources "limits" $limits }}
      {{- toYaml $resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/harness
        readOnly: true
      - name: tmp
        mountPath: /tmp
      - name: data
        mountPath: /var/lib/harness
      - name: runs
        mountPath: /run/harness
      {{- if $root.Values.database.caSecret }}
      - name: database-ca
        mountPath: /etc/harness-database-ca
        readOnly: true
      {{- end }}
      {{- with $root.Values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "harness.fullname" $root }}
  - name: tmp
    emptyDir:
      sizeLimit: {{ default (include "harness.tmpSize" (dict "root" $root "slots" .slots)) $root.Values.tmpSizeLimit }}
  - name: data
    emptyDir:
      sizeLimit: {{ $root.Values.dataSizeLimit }}
  - name: runs
    emptyDir:
      sizeLimit: {{ $root.Values.runSizeLimit }}
  {{- if $root.Values.database.caSecret }}
  - name: database-ca
    secret:
      secretName: {{ $root.Values.database.caSecret }}
  {{- end }}
  {{- with $root.Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
