{{/* One worker group: args dict(root, group, kind: cpu|gpu, port). */}}
{{- define "protege.workerGroup" -}}
{{- $g := .group -}}
- groupName: {{ $g.groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- if lt (int $g.maxReplicas) (int $g.replicas) }}
  {{- fail (printf "%sWorkers.maxReplicas (%v) is less than replicas (%v)" .kind $g.maxReplicas $g.replicas) }}
  {{- end }}
  rayStartParams:
    {{- range $k, $v := $g.rayStartParams }}
    {{ $k }}: {{ $v | toString | quote }}
    {{- end }}
    {{- if not $g.rayStartParams }} {}{{ end }}
  template:
    {{- include "protege.rayPodTemplate" . | nindent 4 }}
{{- end }}

{{/* A Ray pod template: args dict(root, group, kind: head|cpu|gpu, port). */}}
{{- define "protege.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $v := $root.Values -}}
{{- $tag := default $root.Chart.AppVersion $v.image.tag -}}
{{- if eq .kind "gpu" }}{{ $tag = default $tag $v.image.gpuTag }}{{ end -}}
metadata:
  labels:
    {{- include "protege.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: ray
    protege.dev/ray-group: {{ .kind }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with include "protege.podAnnotations" $root | trim }}
  annotations:
    {{- . | nindent 4 }}
  {{- end }}
spec:
  {{- with include "protege.podSpecCommon" $root | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: {{ if eq .kind "head" }}ray-head{{ else }}ray-worker{{ end }}
      image: {{ printf "%s:%s" (required "image.repository: missing (an image with protege installed, e.g. registry.example.com/protege)" $v.image.repository) $tag | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with include "protege.env" $root | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      ports:
        {{- if eq .kind "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        {{- if $v.head.rayClientPort }}
        - {name: client, containerPort: 10001}
        {{- end }}
        {{- end }}
        - {name: serve, containerPort: {{ .port }}}
      resources:
        {{- $res := deepCopy ($g.resources | default dict) }}
        {{- if eq .kind "gpu" }}
        {{- $limits := $res.limits | default dict }}
        {{- $_ := set $limits "nvidia.com/gpu" (toString $g.gpusPerPod) }}
        {{- $_ := set $res "limits" $limits }}
        {{- $requests := $res.requests | default dict }}
        {{- $_ := set $requests "nvidia.com/gpu" (toString $g.gpusPerPod) }}
        {{- $_ := set $res "requests" $requests }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        {{- include "protege.volumeMounts" $root | nindent 8 }}
      {{- if $v.probes.ray }}
      {{- $ray := "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success" }}
      {{- if eq .kind "head" }}
      {{- $ray = printf "%s && wget -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success" $ray }}
      {{- end }}
      livenessProbe:
        exec:
          command: [bash, -c, {{ $ray | quote }}]
        initialDelaySeconds: 30
        periodSeconds: 5
        timeoutSeconds: 2
        failureThreshold: 120
      {{- if or (eq .kind "head") (not $v.probes.gateway) }}
      readinessProbe:
        exec:
          command: [bash, -c, {{ $ray | quote }}]
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 2
        failureThreshold: 10
      {{- end }}
      {{- end }}
      {{- if and $v.probes.gateway (ne .kind "head") }}
      # Ready when the gateway answers through this pod's Serve proxy (models loaded, app running).
      readinessProbe:
        httpGet:
          path: {{ $v.probes.gatewayPath }}
          port: serve
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 2
        failureThreshold: 3
      {{- end }}
  volumes:
    {{- include "protege.volumes" $root | nindent 4 }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
