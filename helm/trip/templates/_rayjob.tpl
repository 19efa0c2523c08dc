{{/*
One RayJob (ray.io/v1): a Ray cluster (head + one worker group) created for the job,
the driver `python -m <module> --config /etc/trip/config.yaml` submitted to it, and the
cluster deleted after it finishes. Used by the training and the preprocessing job.
Arguments (dict): root, job (train|preprocess values), component, module, workerPorts,
exporter (bool), autoscaler (bool), driverPort (int: the driver's exporter port on the
head pod, 0 for none).
*/}}
{{- define "trip.rayJob" -}}
{{- $root := .root }}
{{- $job := .job }}
{{- $args := concat (list "python" "-m" .module "--config" "/etc/trip/config.yaml") ($job.extraArgs | default list) }}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ include "trip.rayJobName" (list $root .component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "trip.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with include "trip.queueLabels" $root }}
    {{- . | trim | nindent 4 }}
    {{- end }}
  annotations:
    # Which run config the job was submitted with (KubeRay does not resubmit a started job on
    # change: delete it, or install under a new run name, to run a new config).
    trip.io/config-checksum: {{ toYaml $root.Values.runConfig | sha256sum | trunc 16 | quote }}
spec:
  entrypoint: {{ join " " $args | quote }}
  shutdownAfterJobFinishes: {{ $job.shutdownAfterJobFinishes }}
  ttlSecondsAfterFinished: {{ $job.ttlSecondsAfterFinished }}
  backoffLimit: {{ $job.backoffLimit }}
  {{- with $job.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ . }}
  {{- end }}
  submissionMode: K8sJobMode
  submitterPodTemplate:
    {{- include "trip.submitterPodTemplate" (dict "root" $root "component" .component) | nindent 4 }}
  rayClusterSpec:
    rayVersion: {{ $root.Values.rayVersion | quote }}
    authOptions:
      mode: {{ $root.Values.rayAuth.mode }}
    enableInTreeAutoscaling: {{ .autoscaler }}
    {{- if .autoscaler }}
    autoscalerOptions:
      upscalingMode: {{ $root.Values.train.autoscaler.upscalingMode }}
      idleTimeoutSeconds: {{ $root.Values.train.autoscaler.idleTimeoutSeconds }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      resources:
        {{- toYaml $root.Values.train.autoscaler.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
    {{- end }}
    {{- $headPorts := include "trip.headPorts" $root | fromYamlArray }}
    {{- if gt (int .driverPort) 0 }}
    {{- $headPorts = append $headPorts (dict "name" "trip-metrics" "containerPort" (int .driverPort) "protocol" "TCP") }}
    {{- end }}
    headGroupSpec:
      rayStartParams:
        {{- $head := merge (dict) ($job.head.rayStartParams | default dict) (dict "dashboard-host" "0.0.0.0" "metrics-export-port" "8080") }}
        {{- range $k, $val := $head }}
        {{ $k }}: {{ $val | quote }}
        {{- end }}
      template:
        {{- include "trip.rayPodTemplate" (dict "root" $root "group" $job.head "component" .component "node" "head" "ports" $headPorts "gpus" 0 "exporter" (gt (int .driverPort) 0) "automount" .autoscaler) | nindent 8 }}
    workerGroupSpecs:
      - groupName: {{ $job.workers.groupName }}
        replicas: {{ $job.workers.replicas }}
        minReplicas: {{ $job.workers.minReplicas }}
        maxReplicas: {{ $job.workers.maxReplicas }}
        rayStartParams:
          {{- $worker := merge (dict) ($job.workers.rayStartParams | default dict) (dict "metrics-export-port" "8080") }}
          {{- range $k, $val := $worker }}
          {{ $k }}: {{ $val | quote }}
          {{- end }}
        template:
          {{- include "trip.rayPodTemplate" (dict "root" $root "group" $job.workers "component" .component "node" "worker" "ports" .workerPorts "gpus" $job.workers.gpus "gpuResourceName" $job.workers.gpuResourceName "exporter" .exporter "automount" false) | nindent 10 }}
{{- end }}
