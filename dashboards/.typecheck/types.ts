// The shapes the generated dashboards must have, from Grafana's published schema (@grafana/schema, the version of
// the Grafana image in docker-compose.yml). dashboards/typecheck.py writes dashboards.gen.ts, where every dashboard
// and every panel is an object literal that `satisfies` these types: an unknown field name, a wrong type or an
// enum value Grafana does not know fails `tsc --noEmit` (make check-dashboards).
import type {
  DataQuery,
  Dashboard,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
} from '@grafana/schema';
import type * as Stat from './node_modules/@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as Table from './node_modules/@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as Text from './node_modules/@grafana/schema/dist/esm/raw/composable/text/panelcfg/x/TextPanelCfg_types.gen';
import type * as TimeSeries from './node_modules/@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as StateTimeline from './node_modules/@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';

/** JSON spells an enum member by its value: `${E}` turns a string enum into the union of its values. */
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends (infer U)[]
      ? Json<U>[]
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

/** A raw InfluxQL target of Grafana's InfluxDB datasource (public/app/plugins/datasource/influxdb/types.ts,
 * InfluxQuery, Grafana 11.6): the schema package has no type for it. */
export interface InfluxQLTarget extends DataQuery {
  query: string;
  rawQuery: boolean;
  resultFormat: 'time_series' | 'table' | 'logs';
  alias?: string;
}

/** A panel of one plugin: its options and custom field config typed by that plugin's published schema (all
 * optional: Grafana fills in the defaults), its targets InfluxQL. */
type PanelOf<Type extends string, Options, Custom> = Omit<Panel, 'type' | 'options' | 'fieldConfig' | 'targets'> & {
  type: Type;
  options?: Partial<Options>;
  fieldConfig?: Omit<FieldConfigSource, 'defaults'> & {
    defaults: Omit<FieldConfig, 'custom'> & { custom?: Partial<Custom> };
  };
  targets?: InfluxQLTarget[];
};

export type StatPanel = Json<PanelOf<'stat', Stat.Options, Record<string, never>>>;
export type TablePanel = Json<PanelOf<'table', Table.Options, Table.FieldConfig>>;
export type TextPanel = Json<PanelOf<'text', Text.Options, Record<string, never>>>;
export type TimeSeriesPanel = Json<PanelOf<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>>;
export type StateTimelinePanel = Json<PanelOf<'state-timeline', StateTimeline.Options, StateTimeline.FieldConfig>>;
export type AnyPanel = StatPanel | TablePanel | TextPanel | TimeSeriesPanel | StateTimelinePanel | Json<RowPanel>;

export type DashboardJson = Json<Omit<Dashboard, 'panels'>> & { panels: AnyPanel[] };
